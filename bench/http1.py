"""A minimal HTTP/1.1 client on asyncio streams, for the load the bench makes.

The bench shares the machine's cores with the platform it measures, so whatever its
client spends is taken from the services. A general client (httpx: URL objects,
header models, h11's state machine, anyio cancel scopes) costs a millisecond or two
of CPU per request; this one costs little more than the bytes. It knows only what the
bench needs: plain ``http://`` on a host and port, bodies of known length,
responses framed by ``Content-Length``, by chunks or by the connection closing,
keep-alive, and a response body read as a stream (SSE). No TLS, redirects, proxies,
cookies, compression or ``Expect: 100-continue``.

Every failure is a :class:`RequestFailed` whose message names the server and what
went wrong (refused, timed out, closed early, not HTTP/1.x); the original error is
its ``__cause__``. A connection that failed is closed and opened afresh on next use;
a request is never retried, since a POST that may have reached the server cannot
be repeated without perhaps storing it twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

# uvicorn closes a keep-alive connection idle for 5 s. A request written just as
# the server closes is lost without an answer, so a connection idle for longer than
# this is replaced before use rather than raced.
MAX_IDLE_S = 4.0
# Bigger heads than this are not what the bench talks to.
HEAD_LIMIT = 64 * 1024
_NO_BODY = frozenset({204, 304})
# What a broken connection or a garbled answer raises on the way up.
_BROKEN = (OSError, EOFError, ValueError, asyncio.LimitOverrunError)


class RequestFailed(Exception):
    """A request got no complete HTTP answer; the message says why."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    # Lower-case names; a repeated header keeps its last value.
    headers: dict[bytes, bytes]
    body: bytes


def prepare(
    method: str, target: str, host: str, headers: Mapping[str, str] | None = None
) -> bytes:
    """The request line and headers, without Content-Length and the blank line.

    Built once and sent many times: the bench's requests differ only in their body.
    """
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    """Status and headers of the next response; 1xx interim answers are skipped."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].split(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        status = int(rest[:3])
        if status >= 200:
            break
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def iter_body(
    reader: asyncio.StreamReader, status: int, headers: Mapping[bytes, bytes]
) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive, framed the way the headers say."""
    if status in _NO_BODY:
        return
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                # Trailers, if any, end with an empty line.
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return
            chunk = await reader.readexactly(size + 2)
            yield chunk[:-2]
    length = headers.get(b"content-length")
    if length is not None:
        if int(length):
            yield await reader.readexactly(int(length))
        return
    while data := await reader.read(65536):
        yield data


def keeps_alive(status: int, headers: Mapping[bytes, bytes]) -> bool:
    """Whether the connection may carry another request after this response."""
    if b"close" in headers.get(b"connection", b"").lower():
        return False
    framed = b"content-length" in headers or b"transfer-encoding" in headers
    return framed or status in _NO_BODY


class Connection:
    """One keep-alive connection, opened on first use and again after a failure.

    A request is :meth:`start` (write it, read the status and headers) and then
    :meth:`body`; :meth:`send` does both and returns the whole response. Neither has
    a timeout of its own: the caller bounds them, and closes the connection when a
    bound cuts an exchange short.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._idle_since = 0.0
        self._status = 0
        self._headers: dict[bytes, bytes] = {}

    @property
    def is_open(self) -> bool:
        return (
            self._writer is not None
            and self._reader is not None
            and not self._writer.is_closing()
            and not self._reader.at_eof()
        )

    async def start(self, prepared: bytes, body: bytes | None = None) -> int:
        """Write one request; read its status and headers (see :attr:`headers`).

        ``body=None`` sends no content and no Content-Length (a GET); ``b""`` sends
        an empty body, ``Content-Length: 0`` (a POST without content).
        """
        try:
            if not self.is_open or time.monotonic() - self._idle_since > MAX_IDLE_S:
                self.close()
                self._reader, self._writer = await asyncio.open_connection(
                    self.host, self.port, limit=HEAD_LIMIT
                )
            writer, reader = self._writer, self._reader
            if writer is None or reader is None:
                raise RuntimeError("a connection just opened is closed")
            if body is None:
                writer.write(prepared + b"\r\n")
            else:
                writer.write(
                    b"%bContent-Length: %d\r\n\r\n%b" % (prepared, len(body), body)
                )
            await writer.drain()
            self._status, self._headers = await read_head(reader)
        except _BROKEN as exc:
            self.close()
            raise self._failed(exc) from exc
        return self._status

    @property
    def headers(self) -> dict[bytes, bytes]:
        """The headers of the response :meth:`start` read last."""
        return self._headers

    async def body(self) -> AsyncIterator[bytes]:
        """The body of that response, as it arrives.

        Read to its end, the connection is ready for the next request, or closed
        when the response said it would not carry another.
        """
        reader = self._reader
        if reader is None:
            raise RuntimeError("body() needs a started request")
        try:
            async for part in iter_body(reader, self._status, self._headers):
                yield part
        except _BROKEN as exc:
            self.close()
            raise self._failed(exc) from exc
        if keeps_alive(self._status, self._headers):
            self._idle_since = time.monotonic()
        else:
            self.close()

    async def send(self, prepared: bytes, body: bytes | None = None) -> Response:
        """One request and its whole response."""
        status = await self.start(prepared, body)
        parts = [part async for part in self.body()]
        return Response(status, self._headers, b"".join(parts))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    def _failed(self, exc: BaseException) -> RequestFailed:
        where = f"{self.host}:{self.port}"
        if isinstance(exc, asyncio.IncompleteReadError):
            when = "mid-answer" if exc.partial else "before answering"
            return RequestFailed(f"{where} closed the connection {when}")
        return RequestFailed(f"{where}: {exc!r}")


class Pool:
    """A fixed number of keep-alive connections to one server, shared by requests.

    A request waits for a free connection, so at most ``size`` are on the wire at
    once; ``timeout`` bounds the wait and the exchange together.
    """

    def __init__(self, url: str, size: int, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url must be http://host[:port], got {url!r}")
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.authority = parts.netloc
        self._timeout = timeout
        # Last in, first out: the connection used last is the one most likely open,
        # and at a low rate the others stay closed instead of timing out.
        self._idle: asyncio.LifoQueue[Connection] = asyncio.LifoQueue()
        self._all = [Connection(self.host, self.port) for _ in range(size)]
        for conn in self._all:
            self._idle.put_nowait(conn)

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def prepare(
        self, method: str, target: str, headers: Mapping[str, str] | None = None
    ) -> bytes:
        return prepare(method, target, self.authority, headers)

    async def send(self, prepared: bytes, body: bytes | None = None) -> Response:
        """One request, from :meth:`prepare` plus its body; raises RequestFailed."""
        conn: Connection | None = None
        try:
            async with asyncio.timeout(self._timeout):
                conn = await self._idle.get()
                return await conn.send(prepared, body)
        except BaseException as exc:
            # Whatever was half written or half read is of no use to the next
            # request, cancellation included.
            if conn is not None:
                conn.close()
            if isinstance(exc, TimeoutError):
                raise RequestFailed(
                    f"no answer from {self.authority} in {self._timeout:g} s"
                ) from exc
            raise
        finally:
            if conn is not None:
                self._idle.put_nowait(conn)

    def close(self) -> None:
        for conn in self._all:
            conn.close()
