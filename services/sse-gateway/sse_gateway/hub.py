"""Open browser connections on this replica, by user, and the feed that fills them.

Each connection owns one small queue. :class:`InboxListener` holds one PostgreSQL
connection that LISTENs on the inbox channel, and a single task that turns
notifications into queue items in the order PostgreSQL delivered them (commit
order). When the LISTEN connection is lost, anything announced meanwhile is gone, so
after reconnecting every open connection is told to re-read the inbox from the last
sequence number it wrote (a ``resync`` item).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import asyncpg

from sse_gateway import inbox

logger = logging.getLogger(__name__)

Item = tuple[str, Any]
RESYNC: Item = ("resync", None)


class Connection:
    __slots__ = ("last_seq", "queue", "user_id")

    def __init__(self, user_id: int) -> None:
        self.user_id = user_id
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.last_seq = 0


class Hub:
    def __init__(self) -> None:
        self._by_user: dict[int, set[Connection]] = {}
        self.events_written = 0

    def add(self, conn: Connection) -> None:
        self._by_user.setdefault(conn.user_id, set()).add(conn)

    def remove(self, conn: Connection) -> None:
        conns = self._by_user.get(conn.user_id)
        if conns is None:
            return
        conns.discard(conn)
        if not conns:
            del self._by_user[conn.user_id]

    def has(self, user_id: int) -> bool:
        return user_id in self._by_user

    @property
    def connections(self) -> int:
        return sum(len(c) for c in self._by_user.values())

    def publish(self, user_id: int, item: Item) -> int:
        conns = self._by_user.get(user_id, ())
        for conn in conns:
            conn.queue.put_nowait(item)
        return len(conns)

    def resync_all(self) -> None:
        for conns in self._by_user.values():
            for conn in conns:
                conn.queue.put_nowait(RESYNC)


class InboxListener:
    def __init__(self, database_url: str, pool: asyncpg.Pool, hub: Hub) -> None:
        self._url = database_url
        self._pool = pool
        self._hub = hub
        self._inbox: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = asyncio.Event()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="inbox-listen"),
            asyncio.create_task(self._process(), name="inbox-process"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._inbox.put_nowait(payload)

    async def _listen(self) -> None:
        first = True
        while True:
            try:
                conn = await asyncpg.connect(self._url, timeout=5)
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
            except (
                TimeoutError,
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
            ) as exc:
                logger.warning(
                    "inbox LISTEN connection lost: %r",
                    exc,
                    extra={"action": "inbox.listen_lost"},
                )
            finally:
                self.listening.clear()
                conn.terminate()

    async def _process(self) -> None:
        while True:
            payload = await self._inbox.get()
            try:
                await self._dispatch(json.loads(payload))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception(
                    "could not hand an inbox event to its connections",
                    extra={"action": "inbox.dispatch_failed"},
                )

    async def _dispatch(self, message: dict[str, Any]) -> None:
        user_id = int(message["u"])
        if not self._hub.has(user_id):
            return
        if message.get("kind") == "notification":
            data = message.get("event")
            if data is None:
                async with self._pool.acquire(timeout=5) as conn:
                    row = await conn.fetchrow(inbox.BY_ID, int(message["ref"]))
                if row is None:
                    return
                data = inbox.event(row)
            self._hub.publish(user_id, ("notification", data))
        else:
            self._hub.publish(user_id, (message.get("kind", "update"), message))
