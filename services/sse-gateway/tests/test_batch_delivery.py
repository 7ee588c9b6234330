"""Delivering many notifications in one transaction, on the real PostgreSQL: the
numbers and unread counts each event carries, and rows that are not there to
deliver."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from contracts.settings import Settings
from sse_gateway import inbox
from tests.sse import helpers
from tests.support.data import Demo, seed_demo
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

SENTINEL = {"kind": "test.sentinel", "u": 0}


@pytest.fixture
async def demo(settings: Settings) -> Demo:
    return await seed_demo(settings.database_url)


class Heard:
    """Every message PostgreSQL delivered on the inbox channel, in its order."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.messages: list[dict[str, Any]] = []

    def on_notify(self, _c: object, _pid: int, _channel: str, payload: str) -> None:
        self.messages.append(json.loads(payload))

    def notifications(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("kind") == "notification"]

    def events(self) -> list[tuple[int, dict[str, Any]]]:
        """(user, event) of each inline notification, in the order heard."""
        return [(m["u"], m["event"]) for m in self.notifications() if "event" in m]

    async def settle(self) -> None:
        """Return once everything committed before this call has been heard.

        PostgreSQL delivers notifications in commit order, so a sentinel sent now
        arrives after all of them.
        """
        await self._conn.execute(
            "SELECT pg_notify($1, $2)", inbox.NOTIFY_CHANNEL, json.dumps(SENTINEL)
        )

        async def arrived() -> bool:
            return SENTINEL in self.messages

        await eventually(arrived, what="the sentinel notification")
        self.messages.remove(SENTINEL)


@asynccontextmanager
async def listening(url: str) -> AsyncIterator[Heard]:
    conn = await asyncpg.connect(url, timeout=10)
    heard = Heard(conn)
    await conn.add_listener(inbox.NOTIFY_CHANNEL, heard.on_notify)
    try:
        yield heard
    finally:
        await conn.close()


async def test_a_batch_numbers_each_users_rows_in_id_order_after_what_they_had(
    settings: Settings, demo: Demo
) -> None:
    async with helpers.database(settings.database_url) as pg:
        # Bob already has two in his inbox, one of them read.
        old = [await helpers.add_and_deliver(pg, demo.bob, f"old {i}") for i in (1, 2)]
        await pg.execute(
            "UPDATE notifications SET read_at = now() WHERE id = $1", old[0]
        )
        b1 = await helpers.add(pg, demo.bob, "b1")
        a1 = await helpers.add(pg, demo.alice, "a1")
        b2 = await helpers.add(pg, demo.bob, "b2")
        c1 = await helpers.add(pg, demo.carol, "c1")
        b3 = await helpers.add(pg, demo.bob, "b3")

        async with listening(settings.database_url) as heard:
            async with pg.transaction():
                answers = await inbox.deliver_many(pg, [b3, a1, b1, c1, b2])
            await heard.settle()
        stored = dict(
            await pg.fetch(
                "SELECT id, inbox_seq FROM notifications WHERE status = 'sent'"
            )
        )
        last = dict(await pg.fetch("SELECT user_id, last_seq FROM inbox_sequences"))

    assert answers == [None] * 5
    events = heard.events()
    assert [event["id"] for _, event in events] == [b1, a1, b2, c1, b3]

    def shown(user: int) -> list[tuple[int, int]]:
        return [(e["seq"], e["unread"]) for u, e in events if u == user]

    # The unread count after each row, as delivering them one by one would show it.
    assert shown(demo.bob) == [(3, 2), (4, 3), (5, 4)]
    assert shown(demo.alice) == [(1, 1)]
    assert shown(demo.carol) == [(1, 1)]
    assert [stored[n] for n in (b1, b2, b3, a1, c1)] == [3, 4, 5, 1, 1]
    assert last == {demo.bob: 5, demo.alice: 1, demo.carol: 1}


async def test_an_event_too_big_to_notify_inline_is_sent_as_a_reference(
    settings: Settings, demo: Demo
) -> None:
    async with helpers.database(settings.database_url) as pg:
        small = await helpers.add(pg, demo.bob, "small")
        big = await helpers.add(pg, demo.bob, "big")
        await pg.execute(
            "UPDATE notifications SET message = repeat('x', 8000) WHERE id = $1", big
        )
        async with listening(settings.database_url) as heard:
            async with pg.transaction():
                await inbox.deliver_many(pg, [small, big])
            await heard.settle()

    inline, reference = heard.notifications()
    assert inline["event"]["id"] == small and inline["event"]["unread"] == 1
    assert reference == {"kind": "notification", "u": demo.bob, "ref": big, "unread": 2}


async def test_rows_not_waiting_are_answered_as_they_are_and_never_announced(
    settings: Settings, demo: Demo
) -> None:
    async with helpers.database(settings.database_url) as pg:
        sent = await helpers.add_and_deliver(pg, demo.bob, "already sent")
        skipped = await helpers.add(pg, demo.bob, "preference off")
        await pg.execute(
            "UPDATE notifications SET status = 'skipped' WHERE id = $1", skipped
        )
        fresh = await helpers.add(pg, demo.bob, "fresh")
        missing = fresh + 1000
        async with listening(settings.database_url) as heard:
            async with pg.transaction():
                answers = await inbox.deliver_many(
                    pg, [sent, missing, fresh, skipped, fresh, inbox.MAX_ID + 1]
                )
            await heard.settle()
        seq_of_sent = await pg.fetchval(
            "SELECT inbox_seq FROM notifications WHERE id = $1", sent
        )

    # A copy of an id later in the same batch answers like a redelivery.
    assert answers == ["sent", "missing", None, "skipped", "sent", "missing"]
    assert [(e["id"], e["seq"], e["unread"]) for _, e in heard.events()] == [
        (fresh, 2, 2)
    ]
    assert seq_of_sent == 1
