"""Open browser connections on this replica, by user, and the feeds that fill them.

Each connection owns a small mailbox, not a task. Three things put items into it:

- :class:`InboxListener` holds one PostgreSQL connection that LISTENs on the inbox
  channel, and a single task that turns notifications into mailbox items in the
  order PostgreSQL delivered them (commit order);
- the hub's clock, one task for the whole replica, which drops a heartbeat into
  every mailbox each interval, closes streams whose token has expired, closes
  every stream when the server starts shutting down, and cancels a stream whose
  write has waited longer than the send timeout (a peer that stopped reading);
- the connection's own disconnect watcher, which closes it when the peer goes.

When the LISTEN connection is lost, anything announced meanwhile is gone, so after
reconnecting every open connection is told to re-read the inbox from the last
sequence number it wrote (a ``resync`` item). A mailbox that fills up because its
client reads too slowly is collapsed into the same ``resync`` item: notifications
are re-read from PostgreSQL and nothing is held twice in memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg
from sse_starlette.sse import AppStatus

from contracts.db import application_name, is_unavailable
from contracts.tasks import stop_task
from sse_gateway import events, inbox, metrics

logger = logging.getLogger(__name__)

Item = tuple[str, Any]
RESYNC: Item = ("resync", None)
PING: Item = ("ping", None)
CLOSE: Item = ("close", None)

# Items a connection may hold before it is collapsed into one resync.
MAX_PENDING = 256
# How often the clock looks for a shutdown or an expired token.
CLOCK_TICK = 0.5


class Connection:
    """One open stream: who it belongs to, where it is, and what waits for it."""

    __slots__ = (
        "_items",
        "_waiter",
        "acked",
        "acked_mark",
        "closed",
        "expires_at",
        "last_seq",
        "sending_since",
        "stalled",
        "task",
        "user_id",
    )

    def __init__(self, user_id: int, expires_at: float = float("inf")) -> None:
        self.user_id = user_id
        self.expires_at = expires_at
        self.last_seq = 0
        self.closed = False
        # Set while a write is in progress; the clock cancels ``task`` when it has
        # waited too long, and ``stalled`` tells the stream why it was cancelled.
        self.sending_since: float | None = None
        self.stalled = False
        # How many bytes the peer has acknowledged, when the socket can say
        # (tcp_info's tcpi_bytes_acked); and that count as the clock noted it
        # during the write in progress.
        self.acked: Callable[[], int | None] | None = None
        self.acked_mark: int | None = None
        self.task: asyncio.Task[Any] | None = None
        self._items: list[Item] = []
        self._waiter: asyncio.Future[None] | None = None

    def push(self, item: Item) -> None:
        if self.closed:
            return
        if item is CLOSE:
            self.closed = True
            self._items = [CLOSE]
        elif len(self._items) >= MAX_PENDING:
            # Replay from the last written sequence number covers every dropped
            # notification; the resync also re-sends the unread count.
            self._items = [RESYNC]
        else:
            self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self.push(CLOSE)

    async def take(self) -> list[Item]:
        """Every item waiting, oldest first; waits while there is none."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items


class Hub:
    def __init__(
        self, heartbeat_seconds: float = 15.0, send_timeout: float = 30.0
    ) -> None:
        self._by_user: dict[int, set[Connection]] = {}
        self._count = 0
        self.heartbeat_seconds = heartbeat_seconds
        self.send_timeout = send_timeout
        self._clock: asyncio.Task[None] | None = None

    def add(self, conn: Connection) -> None:
        self._by_user.setdefault(conn.user_id, set()).add(conn)
        self._count += 1
        metrics.CONNECTIONS.inc()

    def full(self, user_id: int, limit: int) -> bool:
        """Whether the user already has ``limit`` streams here."""
        return len(self._by_user.get(user_id, ())) >= limit

    def admit(self, conn: Connection, limit: int) -> bool:
        """Add ``conn`` unless its user already has ``limit`` streams here.

        Counting and adding happen with no await in between, so requests that
        arrive together cannot all pass the check.
        """
        if self.full(conn.user_id, limit):
            return False
        self.add(conn)
        return True

    def remove(self, conn: Connection) -> None:
        conns = self._by_user.get(conn.user_id)
        if conns is None or conn not in conns:
            return
        conns.discard(conn)
        self._count -= 1
        metrics.CONNECTIONS.dec()
        if not conns:
            del self._by_user[conn.user_id]

    def has(self, user_id: int) -> bool:
        return user_id in self._by_user

    @property
    def connections(self) -> int:
        return self._count

    def publish(self, user_id: int, item: Item) -> int:
        conns = self._by_user.get(user_id, ())
        for conn in conns:
            conn.push(item)
        return len(conns)

    def broadcast(self, item: Item) -> None:
        for conns in self._by_user.values():
            for conn in conns:
                conn.push(item)

    def resync_all(self) -> None:
        self.broadcast(RESYNC)

    def close_all(self) -> None:
        self.broadcast(CLOSE)

    def start(self) -> None:
        self._clock = asyncio.create_task(self._tick(), name="sse-hub-clock")

    async def stop(self) -> None:
        self.close_all()
        if self._clock is not None:
            self._clock.cancel()
            await asyncio.gather(self._clock, return_exceptions=True)

    async def _tick(self) -> None:
        next_beat = time.monotonic() + self.heartbeat_seconds
        while True:
            await asyncio.sleep(min(CLOCK_TICK, self.heartbeat_seconds))
            if AppStatus.should_exit:
                # uvicorn waits for open responses before the lifespan ends, so
                # streams must end here for a SIGTERM to drain promptly.
                self.close_all()
                continue
            now = time.monotonic()
            self.sweep(time.time(), now)
            if now >= next_beat:
                next_beat = now + self.heartbeat_seconds
                self.broadcast(PING)

    def sweep(self, wall: float, monotonic: float) -> None:
        """Close streams whose token expired; cancel those stuck in a write.

        A write is stuck when it has waited ``send_timeout`` and the peer took no
        byte in its second half. A peer on a slow link that keeps reading is not
        stuck, however long a write waits for the kernel to make room: Linux
        wakes a writer only once half of what waits in its send buffer has gone.
        """
        stuck_since = monotonic - self.send_timeout
        half_since = monotonic - self.send_timeout / 2
        for conns in self._by_user.values():
            for conn in conns:
                if conn.expires_at <= wall:
                    conn.close()
                since = conn.sending_since
                if since is None or conn.stalled or since >= half_since:
                    continue
                if since >= stuck_since:
                    # The second half of the wait: note where the peer was.
                    if conn.acked_mark is None and conn.acked is not None:
                        conn.acked_mark = conn.acked()
                    continue
                acked = conn.acked() if conn.acked is not None else None
                mark = conn.acked_mark
                if acked is not None and mark is not None and acked > mark:
                    # Still reading: give it another half of the timeout.
                    conn.sending_since = half_since
                    conn.acked_mark = acked
                    continue
                conn.stalled = True
                if conn.task is not None:
                    conn.task.cancel()


class InboxListener:
    def __init__(self, database_url: str, pool: asyncpg.Pool, hub: Hub) -> None:
        self._url = database_url
        self._pool = pool
        self._hub = hub
        self._inbox: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.listening = asyncio.Event()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="inbox-listen"),
            asyncio.create_task(self._process(), name="inbox-process"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            await stop_task(task, f"the inbox listener's {task.get_name()}")

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._inbox.put_nowait(payload)

    async def _listen(self) -> None:
        first = True
        while not self._stopping:
            try:
                conn = await asyncpg.connect(
                    self._url,
                    timeout=5,
                    server_settings=application_name("inbox listener"),
                )
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                logger.warning(
                    "cannot LISTEN for inbox events, retrying: %r",
                    exc,
                    extra={"action": "inbox.listen_failed"},
                )
                await asyncio.sleep(1)
                continue
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            try:
                await conn.add_listener(inbox.NOTIFY_CHANNEL, self._on_notify)
                self.listening.set()
                if not first:
                    self._hub.resync_all()
                first = False
                while not lost.is_set():
                    # A dead TCP peer does not always close the socket; probe it.
                    try:
                        await asyncio.wait_for(lost.wait(), timeout=10)
                    except TimeoutError:
                        await conn.fetchval("SELECT 1", timeout=5)
                if not self._stopping:
                    # Ended by the server (a restart, an operator's
                    # pg_terminate_backend): no error on the way says so.
                    logger.warning(
                        "inbox LISTEN connection closed by the database; "
                        "listening again, and every stream catches up",
                        extra={"action": "inbox.listen_lost"},
                    )
            except (
                TimeoutError,
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
            ) as exc:
                if self._stopping:
                    # The stop's cancellation, turned into an error on its way.
                    return
                logger.warning(
                    "inbox LISTEN connection lost: %r",
                    exc,
                    extra={"action": "inbox.listen_lost"},
                )
            finally:
                self.listening.clear()
                conn.terminate()

    async def _process(self) -> None:
        while not self._stopping:
            payload = await self._inbox.get()
            try:
                await self._dispatch(json.loads(payload))
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stopping:
                    return
                logger.exception(
                    "could not hand an inbox event to its connections",
                    extra={"action": "inbox.dispatch_failed"},
                )

    async def _dispatch(self, message: dict[str, Any]) -> None:
        user_id = int(message["u"])
        if not self._hub.has(user_id):
            return
        kind = message.get("kind", "update")
        if kind != "notification":
            public = {k: v for k, v in message.items() if k not in ("u", "kind")}
            self._hub.publish(user_id, (kind, events.named(kind, public)))
            return
        data = message.get("event")
        if data is None:
            try:
                async with self._pool.acquire(timeout=5) as conn:
                    row = await conn.fetchrow(inbox.BY_ID, int(message["ref"]))
            except Exception as exc:
                if not is_unavailable(exc):
                    raise
                # Not lost: the user's streams catch up from what they have read,
                # as after any gap.
                logger.warning(
                    "could not read a notification too large to announce whole: "
                    "%r; the user's streams catch up instead",
                    exc,
                    extra={"action": "inbox.fetch_failed"},
                )
                self._hub.publish(user_id, RESYNC)
                return
            if row is None:
                return
            data = {**inbox.event(row), "unread": message.get("unread")}
        self._hub.publish(user_id, ("notification", events.notification(data)))
