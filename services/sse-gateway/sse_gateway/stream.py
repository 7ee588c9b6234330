"""One browser's event stream: who may open it, where it starts, how it ends.

An idle stream is held for hours, so what each one keeps alive is what a replica
can hold. Two choices keep that small (``ARCHITECTURE.md`` has the figures):

- :class:`StreamEndpoint` answers ``/sse`` as a plain ASGI callable, ahead of
  FastAPI's routing, middleware and per-request telemetry span, whose frames and
  objects would otherwise stay alive for the whole life of the stream;
- :class:`StreamResponse` keeps sse-starlette's writer, framing, headers, send
  timeout and HEAD handling but replaces its supervisor of four tasks per stream
  (writer, ping, shutdown watcher, disconnect watcher): the request task writes,
  one small task waits for the disconnect, and the hub's single clock supplies
  heartbeats and the shutdown signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import jwt
from sse_starlette import EventSourceResponse
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from contracts.auth import InvalidToken, verify_token
from contracts.db import DatabaseUnavailable, connection, is_unavailable
from contracts.http import (
    UNAVAILABLE_RETRY_AFTER,
    Cors,
    HeadAsGet,
    error,
    invalid_request,
    unavailable_detail,
)
from contracts.settings import Settings
from sse_gateway import credentials, events, inbox, metrics
from sse_gateway.access import require_user
from sse_gateway.hub import Connection, Hub

logger = logging.getLogger(__name__)

# Rows read per replay statement, and the most bytes one write to a stream takes.
# A notification's event may be some 20 KiB (a comment body of 5,000 emoji), so a
# page is held to a few megabytes, and a write to what the transport may buffer
# for one stream: it takes all of a write it is given, however slow the peer.
REPLAY_PAGE = 100
WRITE_BYTES = 64 * 1024
LAST_EVENT_ID = b"last-event-id"
# A refused stream may try again once one of the user's streams has ended, which
# nobody can predict; this keeps a client that honours Retry-After from spinning.
FULL_RETRY_AFTER = 10


class StreamResponse(EventSourceResponse):
    """An SSE response whose only helper task is the disconnect watcher.

    The send timeout is kept by the hub's clock instead of a timer per write:
    a write marks the connection while it is in progress, and the clock cancels
    the stream once a mark is older than the timeout. A write that does not wait
    (nearly all of them) then costs two attribute stores, not a cancel scope and
    a timer, which is most of the cost of writing one event to ten thousand
    streams.
    """

    def __init__(self, conn: Connection, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._conn = conn

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        conn = self._conn
        conn.sending_since = time.monotonic()
        try:
            await send(message)
        except BaseException:
            self._send_interrupted = True
            raise
        finally:
            conn.sending_since = None
            conn.acked_mark = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"].upper() == "HEAD":
            await super().__call__(scope, receive, send)
            return
        self._conn.task = asyncio.current_task()
        self._conn.acked = _acked_bytes(send)
        watcher = asyncio.create_task(self._watch(receive), name="sse-disconnect")
        try:
            await self._stream_response(send)
        except OSError:
            # The peer went away; the generator has already been closed.
            pass
        except asyncio.CancelledError:
            if not self._conn.stalled:
                raise
            # Cancelled by the hub's clock: the peer stopped reading.
            self._conn.task.uncancel()
            logger.warning(
                "a stream stopped draining; dropping it",
                extra={"action": "sse.stalled"},
            )
            await _drop(send)
        finally:
            self._conn.close()
            watcher.cancel()
            # wait() never swallows a cancellation aimed at this task.
            await asyncio.wait({watcher})

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._client_disconnected = True
                self._conn.close()
                return


def _transport(send: Send) -> Any:
    """The transport of the connection ``send`` writes to, or None.

    Uvicorn's ``send`` is a method of the request's cycle, which holds the
    connection's transport (asyncio's or uvloop's: the two share no base class);
    under another server there is none to be had.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    return transport if callable(getattr(transport, "abort", None)) else None


# struct tcp_info (linux/tcp.h): tcpi_bytes_acked, a u64 at this offset, since
# Linux 4.2.
_TCP_INFO_BYTES = 128
_BYTES_ACKED_AT = 120


def _acked_bytes(send: Send) -> Callable[[], int | None] | None:
    """How to read how many bytes the peer of ``send``'s connection acknowledged;
    None where the socket cannot say (another server, another system)."""
    transport = _transport(send)
    sock = transport.get_extra_info("socket") if transport is not None else None
    tcp_info = getattr(socket, "TCP_INFO", None)
    if sock is None or tcp_info is None:
        return None

    def acked() -> int | None:
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, _TCP_INFO_BYTES)
        except OSError:
            return None
        if len(info) < _BYTES_ACKED_AT + 8:
            return None
        return int(struct.unpack_from("Q", info, _BYTES_ACKED_AT)[0])

    return acked


async def _drop(send: Send) -> None:
    """Reset the connection ``send`` writes to, with whatever it still holds.

    A connection closed the usual way first sends what is buffered, which a peer
    that stopped reading never takes: the server's socket and its megabytes of
    send buffer would stay for as long as the peer keeps its end open (in the
    process until the buffer drains, then in the kernel). A reset drops them at
    once. Under a server other than uvicorn (see :func:`_transport`) the
    response is left unfinished, for that server to close.
    """
    transport = _transport(send)
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            # Closing with a zero linger time resets the connection.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    transport.abort()
    # The server learns of the lost connection before this stream returns, and
    # so does not report a response left unfinished.
    await asyncio.sleep(0)


_RESET = struct.pack("ii", 1, 0)


class Refused(Exception):
    """The stream may not open; answer this JSON error instead."""

    def __init__(self, status: int, code: str, detail: str, **headers: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers


class StreamEndpoint:
    """``GET /sse``: verify the token and the user, join the hub, find the start.

    The token comes from ``Authorization: Bearer`` or, for EventSource, which
    cannot set headers, from ``?token=``, read as every other route reads it
    (:mod:`sse_gateway.credentials`): a request that gives more than one is a 422
    before anything else is judged. Refusals are the JSON errors every other route
    answers with. A user may hold ``max_streams`` streams on each replica;
    the limit is per process because the hub is.
    """

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        pool: Callable[[], asyncpg.Pool],
        *,
        heartbeat_seconds: float,
        retry_ms: int,
        send_timeout: float,
        lean: bool,
        origins: frozenset[str],
        max_streams: int,
    ) -> None:
        self._settings = settings
        self._hub = hub
        self._pool = pool
        self._heartbeat = heartbeat_seconds
        self._retry_ms = retry_ms
        self._send_timeout = send_timeout
        self._lean = lean
        self._origins = origins
        self._max_streams = max_streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
        }
        extra = self._cors(headers.get("origin"))
        try:
            token = credentials.given(scope).token
        except credentials.AmbiguousToken as problem:
            await _refuse(scope, receive, send, problem.response(), extra)
            return
        if scope["method"] not in ("GET", "HEAD"):
            refusal = error(
                405, "method_not_allowed", "use GET or HEAD", Allow="GET, HEAD"
            )
            await _refuse(scope, receive, send, refusal, extra)
            return
        if scope.get("http_version") == "1.0":
            # A stream has no length, and HTTP/1.0 has no chunks: the server would
            # send them all the same, and the client read their sizes as events.
            refusal = error(
                505,
                "http_version_not_supported",
                "an event stream needs HTTP/1.1; a proxy in front of the gateway "
                "must speak it (nginx: proxy_http_version 1.1)",
            )
            await _refuse(scope, receive, send, refusal, extra)
            return
        resumes = [value for name, value in scope["headers"] if name == LAST_EVENT_ID]
        if len(resumes) > 1:
            # Where the stream should resume cannot be known; a browser sends one.
            refusal = invalid_request(
                [("last-event-id", "given more than once; send the last id received")]
            )
            await _refuse(scope, receive, send, refusal, extra)
            return
        db = self._pool()
        try:
            user = verify_token(token, self._settings)
            conn = Connection(user.user_id, expires_at=_expiry(token))
            if scope["method"] == "HEAD":
                await self._check(db, conn)
            else:
                replay = await self._join(db, conn, headers.get("last-event-id"))
        except InvalidToken as exc:
            refusal = error(401, "unauthorized", str(exc), **_BEARER)
            await _refuse(scope, receive, send, refusal, extra)
            return
        except Refused as no:
            refusal = error(no.status, no.code, no.detail, **no.headers)
            await _refuse(scope, receive, send, refusal, extra)
            return
        except Exception:
            # Nothing is sent yet, so the browser can still get the JSON shape
            # every route answers with rather than the server's plain-text 500.
            logger.exception(
                "could not open a stream", extra={"action": "sse.open_failed"}
            )
            refusal = error(500, "internal", "the stream could not be opened")
            await _refuse(scope, receive, send, refusal, extra)
            return

        response_headers = {"Cache-Control": "no-cache", **extra}
        if scope["method"] == "HEAD":
            await _head(send, response_headers)
            return

        body = events_of(conn, self._hub, db, replay, self._retry_ms)
        response: EventSourceResponse
        if self._lean:
            # The hub's clock writes the heartbeats, so sse-starlette's ping is off.
            response = StreamResponse(
                conn,
                body,
                ping=0,
                headers=response_headers,
                send_timeout=self._send_timeout,
            )
        else:
            response = EventSourceResponse(
                body,
                ping=self._heartbeat,
                headers=response_headers,
                send_timeout=self._send_timeout,
            )
        try:
            await response(scope, receive, send)
        finally:
            # Also when the response failed before the generator ever ran.
            await body.aclose()
            self._hub.remove(conn)

    async def _check(self, db: asyncpg.Pool, conn: Connection) -> None:
        """What a GET would be refused for, without opening a stream: a token
        whose user does not exist, and one stream too many (which is how a page
        whose EventSource was refused learns why)."""
        try:
            async with connection(db) as pg:
                await require_user(pg, conn.user_id)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            raise _unavailable(exc) from None
        if self._hub.full(conn.user_id, self._max_streams):
            raise self._full(conn)

    async def _join(
        self, db: asyncpg.Pool, conn: Connection, last_event_id: str | None
    ) -> bool:
        """Admit ``conn`` to the hub and set its start; True when it must replay.

        On any failure ``conn`` has left the hub again.
        """
        try:
            async with connection(db) as pg:
                await require_user(pg, conn.user_id)
                # Joined before reading the cursor: an event committed in between
                # is then both queued and replayed, and the sequence check drops
                # the copy.
                if not self._hub.admit(conn, self._max_streams):
                    raise self._full(conn)
                return await start(pg, conn, last_event_id)
        except BaseException as exc:
            self._hub.remove(conn)
            if isinstance(exc, Exception) and is_unavailable(exc):
                # Away, not answering in time, or lacking a table: a 503 like
                # every route's, which the browser's reconnect outlasts.
                raise _unavailable(exc) from None
            raise

    def _full(self, conn: Connection) -> Refused:
        logger.info(
            "user %s already has %d streams open; refusing another",
            conn.user_id,
            self._max_streams,
            extra={"action": "sse.too_many_streams"},
        )
        return Refused(
            429,
            "too_many_streams",
            f"at most {self._max_streams} streams per user may be open at once;"
            " close one first",
            **{"Retry-After": str(FULL_RETRY_AFTER)},
        )

    def _cors(self, origin: str | None) -> dict[str, str]:
        # What the middleware on every other route sends: the page may read
        # the Retry-After of a 429 or 503 too.
        if origin and origin in self._origins:
            return {
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Expose-Headers": ", ".join(Cors.EXPOSED),
                "Vary": "Origin",
            }
        return {}


_BEARER = {"WWW-Authenticate": "Bearer"}


def _unavailable(exc: Exception) -> Refused:
    if not isinstance(exc, DatabaseUnavailable):
        exc = DatabaseUnavailable(f"opening a stream: {exc!r}")
    return Refused(
        503,
        "unavailable",
        unavailable_detail(exc),
        **{"Retry-After": UNAVAILABLE_RETRY_AFTER},
    )


async def _refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    refusal: Response,
    extra: dict[str, str],
) -> None:
    """Answer ``refusal``, an error as every route writes it, with ``extra`` headers;
    to a HEAD, without its body."""
    refusal.headers.update(extra)
    await HeadAsGet(refusal)(scope, receive, send)


async def _head(send: Send, headers: dict[str, str]) -> None:
    """The start of the stream a GET would get, with the headers sse-starlette
    gives it (``Connection``, ``X-Accel-Buffering``), and no body."""
    raw = EventSourceResponse((), ping=0, headers=headers).raw_headers
    await send({"type": "http.response.start", "status": 200, "headers": raw})
    await send({"type": "http.response.body", "body": b""})


def _expiry(token: str | None) -> float:
    """When the (already verified) token expires; the stream is closed then."""
    try:
        claims = jwt.decode(token or "", options={"verify_signature": False})
        return float(claims["exp"])
    except (jwt.InvalidTokenError, KeyError, TypeError, ValueError, OverflowError):
        return float("inf")


async def start(
    pg: asyncpg.Connection, conn: Connection, last_event_id: str | None
) -> bool:
    """Set where ``conn`` starts; True when it must replay from there first.

    A Last-Event-ID that is not one of this user's notifications counts as none:
    the stream starts live, and the inbox API serves the backlog.
    """
    notification_id = notification_id_of(last_event_id)
    if notification_id is not None:
        seq = await pg.fetchval(inbox.SEQ_OF, notification_id, conn.user_id)
        if seq is not None:
            conn.last_seq = seq
            return True
    conn.last_seq = await pg.fetchval(inbox.CURRENT_SEQ, conn.user_id) or 0
    return False


def notification_id_of(last_event_id: str | None) -> int | None:
    """The notification id a Last-Event-ID names, or None if it can name none.

    The gateway only ever sends ids in ASCII decimal. ``str.isdigit`` alone also
    admits digits such as "²", which ``int`` refuses, and any length, which
    ``int`` refuses past 4300 digits and PostgreSQL past bigint.
    """
    value = last_event_id or ""
    if not (value.isascii() and value.isdigit()) or len(value) > _ID_DIGITS:
        return None
    number = int(value)
    return number if 1 <= number <= inbox.MAX_ID else None


_ID_DIGITS = len(str(inbox.MAX_ID))


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
                    for chunk in _writes(out):
                        yield chunk
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
                    for chunk in _writes(out):
                        yield chunk
                    out = []
                    async for chunk in _replay(conn, db):
                        yield chunk
                    yield await _sync(conn, db)
                else:
                    out.append(data)
            for chunk in _writes(out):
                yield chunk
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
        bodies = [
            events.notification(inbox.event(row)).body
            for row in rows
            # The user put it away: showing it again would bring it back.
            if not row["archived"]
        ]
        conn.last_seq = rows[-1]["inbox_seq"]
        last_page = len(rows) < REPLAY_PAGE
        del rows  # the events are all that is kept while the page is written
        metrics.EVENTS_WRITTEN.inc(len(bodies))
        for chunk in _writes(bodies):
            yield chunk
        if last_page:
            return


def _writes(bodies: list[bytes]) -> Iterator[bytes]:
    """``bodies`` joined into writes of at most :data:`WRITE_BYTES`; a body larger
    than that is a write of its own."""
    start, size = 0, 0
    for end, body in enumerate(bodies):
        if size and size + len(body) > WRITE_BYTES:
            yield b"".join(bodies[start:end])
            start, size = end, 0
        size += len(body)
    if size:
        yield b"".join(bodies[start:])


async def _sync(conn: Connection, db: asyncpg.Pool) -> bytes:
    """After a resync, read-state changes may have been missed: send the count."""
    async with connection(db) as pg:
        unread = await pg.fetchval(inbox.UNREAD, conn.user_id)
    return events.named("sync", {"unread": unread})
