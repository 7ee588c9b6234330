"""Last-Event-ID replay: everything stored since that id, in order, then live.

Notification ids are handed out when rows are inserted, not when they commit, so a
row with a smaller id can enter the inbox after a larger one. The stream replays by
the user's inbox sequence, which follows commit order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from contracts.settings import Settings
from tests.sse import helpers
from tests.sse.helpers import add, add_and_deliver, deliver
from tests.support.data import Demo
from tests.support.processes import Service
from tests.support.sse import SSEClient

pytestmark = pytest.mark.integration


def stream(gateway: Service, token: str, last_id: int | None = None) -> SSEClient:
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    return SSEClient(f"{gateway.url}/sse?token={token}", headers=headers)


async def test_replay_includes_rows_that_commit_late_with_smaller_ids(
    settings: Settings, gateway: Service, demo: Demo, token: Callable[..., str]
) -> None:
    bob = token(demo.bob)
    async with helpers.database(settings.database_url) as pg:
        async with stream(gateway, bob) as live:
            seen = await add_and_deliver(pg, demo.bob, "seen")
            await live.wait_for("notification")
        assert live.ids() == [seen]

        # While bob is away: a row inserted first commits last.
        async with helpers.database(settings.database_url) as slow:
            tx = slow.transaction()
            await tx.start()
            early = await add(slow, demo.bob, "early id, late commit")
            later = await add_and_deliver(pg, demo.bob, "later id, early commit")
            await tx.commit()
            await deliver(slow, early)

            # And a delivery that holds the sequence while another waits behind it.
            first, second = await add(pg, demo.bob, "a"), await add(pg, demo.bob, "b")
            tx = slow.transaction()
            await tx.start()
            await helpers.inbox.deliver(slow, second)
            waiting = asyncio.create_task(deliver(pg, first))
            await asyncio.sleep(0)  # let it block on the sequence row
            await tx.commit()
            await waiting
        assert early < later and first < second

        async with stream(gateway, bob, last_id=seen) as back:
            await back.wait_for("notification", 4)
            fresh = await add_and_deliver(pg, demo.bob, "live")
            await back.wait_for("notification", 5)
        assert back.ids() == [later, early, second, first, fresh]
        seqs = [e.json()["seq"] for e in back.of("notification")]
        assert seqs == sorted(seqs) and len(set(seqs)) == 5

        async with stream(gateway, bob, last_id=later) as middle:
            await middle.wait_for("notification", 4)
        assert middle.ids() == [early, second, first, fresh]


async def test_reconnecting_during_a_burst_neither_repeats_nor_skips(
    settings: Settings, gateway: Service, demo: Demo, token: Callable[..., str]
) -> None:
    bob = token(demo.bob)
    total = 150

    async def produce() -> list[int]:
        async with helpers.database(settings.database_url) as pg:
            return [await add_and_deliver(pg, demo.bob, f"n{i}") for i in range(total)]

    received: list[int] = []
    async with helpers.database(settings.database_url) as pg:
        # The first stream opens before anything exists, so it misses nothing.
        async with stream(gateway, bob) as first:
            producer = asyncio.create_task(produce())
            await first.wait_for("notification", 1)
        received += first.ids()
        last = received[-1]
        while len(received) < total:
            async with stream(gateway, bob, last_id=last) as again:
                want = min(len(received) + 20, total) - len(received)
                await again.wait_for("notification", want)
            received += again.ids()
            last = received[-1]
        produced = await producer
        order = await pg.fetch(
            "SELECT id FROM notifications WHERE user_id = $1 ORDER BY inbox_seq",
            demo.bob,
        )
    assert len(received) == len(set(received)), "an event was written twice"
    assert received == [r["id"] for r in order]
    assert sorted(received) == sorted(produced)


async def test_without_last_event_id_the_stream_starts_live(
    settings: Settings, gateway: Service, demo: Demo, token: Callable[..., str]
) -> None:
    async with helpers.database(settings.database_url) as pg:
        old = [await add_and_deliver(pg, demo.bob, f"old {i}") for i in range(3)]
        async with stream(gateway, token(demo.bob)) as live:
            fresh = await add_and_deliver(pg, demo.bob, "fresh")
            await live.wait_for("notification")
    assert live.ids() == [fresh]
    assert fresh not in old


async def test_someone_elses_id_as_last_event_id_replays_nothing(
    settings: Settings, gateway: Service, demo: Demo, token: Callable[..., str]
) -> None:
    async with helpers.database(settings.database_url) as pg:
        alices = await add_and_deliver(pg, demo.alice, "for alice")
        await add_and_deliver(pg, demo.alice, "also for alice")
        await add_and_deliver(pg, demo.bob, "old for bob")
        async with stream(gateway, token(demo.bob), last_id=alices) as probe:
            fresh = await add_and_deliver(pg, demo.bob, "new for bob")
            await probe.wait_for("notification")
    assert probe.ids() == [fresh]
