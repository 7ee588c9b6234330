"""Archived notifications stay archived when a stream catches up.

A stream catches up from PostgreSQL in two cases: a browser reconnecting with its
Last-Event-ID, and a stream whose reader fell behind (or whose replica lost its
LISTEN connection) being resynchronised. Neither brings back what the user archived.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from contracts.db import create_pool
from contracts.settings import Settings
from sse_gateway import inbox
from sse_gateway.hub import RESYNC, Connection, Hub
from sse_gateway.stream import events_of
from tests.sse import helpers
from tests.sse.helpers import add, add_and_deliver, deliver
from tests.support.data import Demo
from tests.support.processes import Service
from tests.support.sse import SSEClient

pytestmark = pytest.mark.integration


def stream(gateway: Service, token: str, last_id: int) -> SSEClient:
    return SSEClient(
        f"{gateway.url}/sse?token={token}", headers={"Last-Event-ID": str(last_id)}
    )


async def test_a_reconnecting_stream_does_not_replay_archived_notifications(
    settings: Settings, gateway: Service, demo: Demo, token: Callable[..., str]
) -> None:
    bob = token(demo.bob)
    async with helpers.database(settings.database_url) as pg:
        seen = await add_and_deliver(pg, demo.bob, "seen")
        archived = await add_and_deliver(pg, demo.bob, "archived")
        # A row with a smaller id that enters the inbox after a larger one is
        # still replayed.
        early = await add(pg, demo.bob, "early id, late commit")
        later = await add_and_deliver(pg, demo.bob, "later id, early commit")
        await deliver(pg, early)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            put_away = await client.post(
                f"/inbox/{archived}/archive",
                headers={"Authorization": f"Bearer {bob}"},
            )
        assert put_away.status_code == 200, put_away.text

        async with stream(gateway, bob, last_id=seen) as back:
            await back.wait_for("notification", 2)
            fresh = await add_and_deliver(pg, demo.bob, "live")
            await back.wait_for("notification", 3)
        # The archived notification's own id is a place to resume from.
        async with stream(gateway, bob, last_id=archived) as from_archived:
            await from_archived.wait_for("notification", 3)

    assert back.ids() == [later, early, fresh]
    assert from_archived.ids() == [later, early, fresh]


async def test_a_resynchronised_stream_does_not_replay_archived_notifications(
    settings: Settings, demo: Demo
) -> None:
    async with helpers.database(settings.database_url) as pg:
        seen = await add_and_deliver(pg, demo.bob, "seen")
        archived = await add_and_deliver(pg, demo.bob, "archived")
        kept = await add_and_deliver(pg, demo.bob, "kept")
        assert await pg.fetch(inbox.ARCHIVE, demo.bob, archived)
        seen_seq = await pg.fetchval(inbox.SEQ_OF, seen, demo.bob)

    hub = Hub()
    conn = Connection(demo.bob)
    hub.add(conn)
    conn.last_seq = seen_seq
    # A reader that fell behind: its mailbox was collapsed into a resync, which
    # re-reads the inbox and ends with the unread count.
    conn.push(RESYNC)
    written = b""
    db = await create_pool(settings, min_size=1, max_size=2)
    body = events_of(conn, hub, db, False, 1000)
    try:
        async with asyncio.timeout(10):
            async for chunk in body:
                written += chunk
                if b"event: sync" in chunk:
                    break
    finally:
        await body.aclose()
        await db.close()

    assert notification_ids(written) == [kept]
    assert hub.connections == 0


def notification_ids(written: bytes) -> list[int]:
    events = written.replace(b"\r\n", b"\n").split(b"\n\n")
    return [
        json.loads(line.removeprefix(b"data: "))["id"]
        for event in events
        if b"event: notification" in event
        for line in event.split(b"\n")
        if line.startswith(b"data: ")
    ]
