"""The hub and a connection's mailbox, without a server or a database."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from sse_gateway import events
from sse_gateway.hub import (
    CLOSE,
    MAX_PENDING,
    PING,
    RESYNC,
    Connection,
    Hub,
    InboxListener,
)


def note(seq: int) -> tuple[str, events.Note]:
    return ("notification", events.notification({"id": seq, "seq": seq}))


async def test_items_arrive_in_order_and_wake_a_waiting_stream() -> None:
    conn = Connection(1)
    waiting = asyncio.create_task(conn.take())
    await asyncio.sleep(0)
    conn.push(note(1))
    conn.push(PING)
    assert await asyncio.wait_for(waiting, 1) == [note(1), PING]


def test_a_reader_that_falls_behind_is_collapsed_into_one_resync() -> None:
    conn = Connection(1)
    for seq in range(MAX_PENDING + 10):
        conn.push(note(seq))
    assert len(conn._items) <= MAX_PENDING
    assert RESYNC in conn._items and conn._items[0] == RESYNC


def test_close_wins_over_everything_waiting_and_is_final() -> None:
    conn = Connection(1)
    conn.push(note(1))
    conn.close()
    conn.push(note(2))
    assert conn._items == [CLOSE]


def test_publish_reaches_only_that_users_connections() -> None:
    hub = Hub()
    mine, also_mine, theirs = Connection(1), Connection(1), Connection(2)
    for conn in (mine, also_mine, theirs):
        hub.add(conn)
    assert hub.publish(1, PING) == 2
    assert mine._items == [PING] and also_mine._items == [PING]
    assert theirs._items == []
    hub.remove(mine)
    hub.remove(mine)
    assert hub.connections == 2


async def test_a_write_that_waits_while_the_peer_takes_bytes_is_not_stuck() -> None:
    hub = Hub(send_timeout=4)
    reading, stopped, unknown = Connection(1), Connection(2), Connection(3)
    acked = {reading: 1000, stopped: 1000}
    reading.acked = lambda: acked[reading]
    stopped.acked = lambda: acked[stopped]
    start = time.monotonic()
    for conn in (reading, stopped, unknown):
        conn.task = asyncio.create_task(asyncio.sleep(60))
        conn.sending_since = start
        hub.add(conn)

    # Ticks through the second half of the wait, the peers' counts as they go.
    hub.sweep(wall=0, monotonic=start + 2.5)
    acked[reading] += 4096
    hub.sweep(wall=0, monotonic=start + 4.5)
    first = [conn.stalled for conn in (reading, stopped, unknown)]
    # Each further half of the timeout, the peer must have taken more to stay.
    acked[reading] += 4096
    hub.sweep(wall=0, monotonic=start + 7.0)
    still = reading.stalled
    hub.sweep(wall=0, monotonic=start + 9.5)

    assert first == [False, True, True]
    assert still is False and reading.stalled is True
    for conn in (reading, stopped, unknown):
        conn.task.cancel()


async def test_the_sweep_closes_expired_streams_and_cancels_stuck_writes() -> None:
    hub = Hub(send_timeout=5)
    expired, stuck, fine = Connection(1, expires_at=100), Connection(2), Connection(3)
    stuck.task = asyncio.create_task(asyncio.sleep(60))
    stuck.sending_since = time.monotonic() - 6
    fine.sending_since = time.monotonic() - 1
    for conn in (expired, stuck, fine):
        hub.add(conn)

    hub.sweep(wall=101, monotonic=time.monotonic())

    assert expired._items == [CLOSE]
    assert stuck.stalled and fine.stalled is False
    await asyncio.sleep(0)
    assert stuck.task.cancelled()


class _PoolWithNoConnectionFree:
    def acquire(self, timeout: float) -> object:
        raise asyncpg.TooManyConnectionsError("no connection free")


async def test_a_large_notification_not_read_in_time_makes_its_streams_catch_up() -> (
    None
):
    hub = Hub()
    bob, carol = Connection(1), Connection(2)
    hub.add(bob)
    hub.add(carol)
    pool: Any = _PoolWithNoConnectionFree()
    listener = InboxListener("postgresql://unused", pool, hub)

    # Announced by reference, too large for a NOTIFY: it must be read to be sent.
    await listener._dispatch({"u": 1, "kind": "notification", "ref": 42})

    assert bob._items == [RESYNC]
    assert carol._items == []
