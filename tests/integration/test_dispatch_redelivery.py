"""Two dispatchers and a redelivered event still make one row and one delivery."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from contracts import topology
from contracts.messages import CommentCreated
from contracts.settings import Settings
from dispatcher.app import DispatcherSettings, create_app
from tests.integration import helpers
from tests.integration.conftest import running
from tests.support.data import Demo
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


async def test_an_event_delivered_three_times_to_two_dispatchers_counts_once(
    settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    body = "a redelivered mention for @bob"
    comment = await db.fetchval(
        "INSERT INTO comments (post_id, author_id, body) VALUES ($1, $2, $3) "
        "RETURNING id",
        demo.post,
        demo.carol,
        body,
    )
    event = CommentCreated(
        event_id=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
        comment_id=comment,
        post_id=demo.post,
        author_id=demo.carol,
        body=body,
    )
    options = DispatcherSettings(**settings.model_dump())

    async with running(create_app(options)), running(create_app(options)):
        await helpers.publish(
            settings.amqp_url,
            [event.to_bytes()] * 3,
            exchange=topology.EVENTS_EXCHANGE,
            routing_key=topology.COMMENT_CREATED,
        )

        async def consumed() -> dict[str, int] | None:
            queues = [topology.DISPATCHER_QUEUE, "notiflow.deliveries.email"]
            found = await helpers.depths(settings.amqp_url, *queues)
            done = found[topology.DISPATCHER_QUEUE] == 0
            return found if done and found["notiflow.deliveries.email"] else None

        await eventually(consumed, what="events consumed")
        rows = await db.fetch(
            "SELECT user_id, type, status FROM notifications WHERE event_id = $1",
            event.event_id,
        )
        queued = await eventually(
            lambda: _settled(settings, db), what="outbox published"
        )

    keys = [(r["user_id"], r["type"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert {(demo.alice, "email"), (demo.bob, "email")} <= set(keys)
    pending = [r for r in rows if r["status"] == "pending"]
    for kind in topology.CHANNEL_TYPES:
        expected = sum(1 for r in pending if r["type"] == kind)
        assert queued[topology.delivery_queue(kind)] == expected, (kind, queued)
    assert await db.fetchval("SELECT count(*) FROM events") == 1


async def _settled(settings: Settings, db: asyncpg.Connection) -> dict | None:
    if await db.fetchval("SELECT count(*) FROM outbox"):
        return None
    return await helpers.depths(
        settings.amqp_url,
        *(topology.delivery_queue(kind) for kind in topology.CHANNEL_TYPES),
    )
