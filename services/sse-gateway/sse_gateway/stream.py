"""One browser's event stream: where it starts, what it replays, how it ends.

sse-starlette frames the events and owns the HTTP response. Its stock response runs
four tasks per stream (writer, ping, shutdown watcher, disconnect watcher); at ten
thousand idle streams those tasks, and the timers under them, are most of what a
stream costs. :class:`StreamResponse` keeps sse-starlette's writer, headers, send
timeout and HEAD handling, and replaces the supervisor: the request task writes,
one small task per stream waits for the disconnect, and the hub's single clock
supplies heartbeats and the shutdown signal (see ``ARCHITECTURE.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from contracts.db import DatabaseUnavailable, connection
from sse_gateway import events, inbox, metrics
from sse_gateway.hub import Connection, Hub

logger = logging.getLogger(__name__)

REPLAY_PAGE = 500


class StreamResponse(EventSourceResponse):
    """An SSE response whose only helper task is the disconnect watcher."""

    def __init__(self, conn: Connection, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._conn = conn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"].upper() == "HEAD":
            await super().__call__(scope, receive, send)
            return
        watcher = asyncio.create_task(self._watch(receive), name="sse-disconnect")
        try:
            await self._stream_response(send)
        except OSError:
            # The peer went away or stopped reading (SendTimeoutError is an
            # OSError too); the generator has already been closed.
            pass
        finally:
            self._conn.close()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._client_disconnected = True
                self._conn.close()
                return


async def start(db: asyncpg.Pool, conn: Connection, last_event_id: str | None) -> bool:
    """Set where ``conn`` starts; True when it must replay from there first.

    A Last-Event-ID that is not one of this user's notifications counts as none:
    the stream starts live, and the inbox API serves the backlog.
    """
    async with connection(db) as pg:
        if last_event_id and last_event_id.isdigit():
            seq = await pg.fetchval(inbox.SEQ_OF, int(last_event_id), conn.user_id)
            if seq is not None:
                conn.last_seq = seq
                return True
        conn.last_seq = await pg.fetchval(inbox.CURRENT_SEQ, conn.user_id) or 0
        return False


async def events_of(
    conn: Connection, hub: Hub, db: asyncpg.Pool, replay: bool, retry_ms: int
) -> AsyncIterator[bytes]:
    """The bytes of one stream, until it is closed; always leaves the hub."""
    try:
        yield events.connected(retry_ms)
        if replay:
            async for chunk in _replay(conn, db):
                yield chunk
        while True:
            out: list[bytes] = []
            for kind, data in await conn.take():
                if kind == "close":
                    if out:
                        yield b"".join(out)
                    return
                if kind == "notification":
                    # A notification both replayed and announced is written once:
                    # sequence numbers only grow along a stream.
                    if data.seq > conn.last_seq:
                        conn.last_seq = data.seq
                        metrics.EVENTS_WRITTEN.inc()
                        out.append(data.body)
                elif kind == "ping":
                    out.append(events.PING)
                elif kind == "resync":
                    if out:
                        yield b"".join(out)
                        out = []
                    async for chunk in _replay(conn, db):
                        yield chunk
                    yield await _sync(conn, db)
                else:
                    out.append(data)
            if out:
                yield b"".join(out)
    except DatabaseUnavailable:
        # Ending the stream makes the browser reconnect with its Last-Event-ID,
        # which replays whatever this stream could not read.
        logger.warning(
            "database unavailable during replay; closing the stream",
            extra={"action": "sse.replay_failed"},
        )
    finally:
        hub.remove(conn)


async def _replay(conn: Connection, db: asyncpg.Pool) -> AsyncIterator[bytes]:
    while True:
        async with connection(db) as pg:
            rows = await pg.fetch(
                inbox.REPLAY, conn.user_id, conn.last_seq, REPLAY_PAGE
            )
        if not rows:
            return
        chunk = []
        for row in rows:
            chunk.append(events.notification(inbox.event(row)).body)
            conn.last_seq = row["inbox_seq"]
        metrics.EVENTS_WRITTEN.inc(len(rows))
        yield b"".join(chunk)
        if len(rows) < REPLAY_PAGE:
            return


async def _sync(conn: Connection, db: asyncpg.Pool) -> bytes:
    """After a resync, read-state changes may have been missed: send the count."""
    async with connection(db) as pg:
        unread = await pg.fetchval(inbox.UNREAD, conn.user_id)
    return events.named("sync", {"unread": unread})
