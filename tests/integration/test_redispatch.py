"""notiflow-admin redispatch: the events of comments whose event was lost after
the outbox gave it to the broker (its queue deleted by hand, say) are published
again, and nobody is notified twice."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from contracts.messages import CommentCreated
from contracts.outbox import enqueue, outgoing_event
from contracts.settings import Settings
from dispatcher.app import DispatcherSettings, create_app
from tests.integration.conftest import running
from tests.integration.test_poison_and_operators import admin
from tests.support.data import Demo
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


async def _comment(db: asyncpg.Connection, demo: Demo, body: str, age: float) -> int:
    return await db.fetchval(
        "INSERT INTO comments (post_id, author_id, body, created_at) "
        "VALUES ($1, $2, $3, now() - make_interval(secs => $4)) RETURNING id",
        demo.post,
        demo.carol,
        body,
        age,
    )


def _event(demo: Demo, comment_id: int, body: str) -> CommentCreated:
    return CommentCreated(
        event_id=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
        comment_id=comment_id,
        post_id=demo.post,
        author_id=demo.carol,
        body=body,
    )


async def test_comments_nobody_was_notified_of_are_dispatched_once_again(
    settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    # Four comments of five minutes ago: one dispatched, one whose event waits
    # in the outbox, one lost on the way, and one of a minute too recent to tell.
    dispatched = await _comment(db, demo, "dispatched @bob", 300)
    await db.execute(
        "INSERT INTO events (id, type, payload, occurred_at, comment_id) "
        "VALUES (gen_random_uuid(), 'comment.created', '{}', now(), $1)",
        dispatched,
    )
    waiting = await _comment(db, demo, "waiting @bob", 300)
    await db.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )
    await enqueue(db, [outgoing_event(_event(demo, waiting, "waiting @bob"))])
    lost = await _comment(db, demo, "lost @bob", 300)
    await _comment(db, demo, "recent @bob", 5)
    since = (datetime.now(UTC) - timedelta(minutes=10)).isoformat()

    done = admin(settings, "redispatch", "--since", since)

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"redispatched comment {lost}",
        "1 comment without an event published again",
    ]
    # The dispatcher takes it up as any event: bob and alice hear of it once.
    app = create_app(DispatcherSettings(**settings.model_dump()))
    async with running(app):
        notified = await eventually(
            lambda: db.fetch(
                "SELECT n.user_id, n.type FROM notifications n "
                "JOIN events e ON e.id = n.event_id WHERE e.comment_id = $1",
                lost,
            ),
            what="the lost comment's notifications",
        )
    again = admin(settings, "redispatch", "--since", since)

    assert {row["user_id"] for row in notified} == {demo.alice, demo.bob}
    # Now dispatched, it is not sent again; the recent one is left alone.
    assert again.stdout.splitlines() == ["0 comments without an event published again"]


def test_redispatch_wants_a_start_before_its_end(settings: Settings) -> None:
    done = admin(
        settings, "redispatch", "--since", "2026-01-02T00:00", "--until", "2026-01-01"
    )

    assert done.returncode == 2
    assert "is not before --until" in done.stderr


def test_redispatch_since_a_time_too_recent_to_look_at_says_so(
    settings: Settings,
) -> None:
    recent = (datetime.now(UTC) - timedelta(seconds=20)).isoformat()

    done = admin(settings, "redispatch", "--since", recent)

    assert done.returncode == 2
    assert "within the last 60 s" in done.stderr
    assert done.stdout == ""


def test_redispatch_since_a_time_to_come_says_so(settings: Settings) -> None:
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()

    done = admin(settings, "redispatch", "--since", later)

    assert done.returncode == 2
    assert "is in the future" in done.stderr
