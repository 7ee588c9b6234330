"""uvicorn's HTTP/1.1 protocol with a deadline for a request's headers.

uvicorn closes a kept-alive connection that stays idle, but nothing closes one
that sends part of a request's headers and then nothing more, or a new connection
that sends nothing at all: such connections hold a file descriptor for good, and
enough of them, which cost the sender nothing, use up the process's. A proxy in
front (nginx's ``client_header_timeout``) closes them, but a service may be
reached directly. :func:`headers_in_time` gives each connection ``seconds`` from
its start, and each further request on it from its first byte, to complete its
headers; past that the connection is closed. A request whose headers arrived is
never cut: a body, a slow response and an SSE stream take as long as they take.

Bytes that are no HTTP request, sent after a request on the same connection, are
answered ``400`` after that request's answer, as a refused request's headers are
(below); uvicorn answered them at once and closed, and the earlier request was
carried out with its answer lost.

Nor does anything bound the headers' size: the parser keeps a header's value in
memory until it ends, and a single header of 50 MB, quick enough for the deadline,
took a process's memory up by 90 MB. A request whose line and headers pass
:data:`MAX_HEADER_BYTES` is answered ``431``, after the answers to any requests
sent before it on the connection, which is then closed. Headers are measured once
complete, and while they come by the bytes read for them, so that the parser never
holds much more than the limit (at most one read more).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

# A request's line and headers together, at most; the longest request line the
# parser takes is as long.
MAX_HEADER_BYTES = 64 * 1024
_TOO_LARGE = b"Request header fields too large."
# How long a refused connection's further requests are read and dropped.
LINGER_SECONDS = 2.0


class _HeadersInTime(HttpToolsProtocol):
    headers_seconds: float = 20.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_deadline: asyncio.TimerHandle | None = None
        # Messages begun, whether one's headers are under way, and whether the
        # next byte read starts a message (none has begun, or the last ended).
        self._begun = 0
        self._in_headers = False
        self._between = True
        # Bytes read of the headers under way, while they are incomplete.
        self._header_bytes = 0
        # Once a request is refused (headers too large, or not HTTP at all), the
        # connection only waits for the answers to the requests before it, then
        # gets the refusal and is closed.
        self._refused = False
        self._refusal: tuple[bytes, bytes] | None = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        begun, between = self._begun, self._between
        super().data_received(data)
        if self._refused or not self._in_headers or self.transport.is_closing():
            return
        # The parser holds an incomplete header in memory until it ends. The read's
        # bytes are counted when they all belong to the headers under way: those
        # begun before it, or with it. Headers begun after a request in the same
        # read are counted from the next read on, and whole once complete.
        if self._begun == begun:
            self._header_bytes += len(data)
        elif self._begun == begun + 1 and between:
            self._header_bytes = len(data)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse_headers()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        self._begun += 1
        self._in_headers, self._between = True, False
        self._header_bytes = 0
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        if self._refused:
            return
        # The request line and headers as sent, give or take their spaces.
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) + 16
        if size > MAX_HEADER_BYTES:
            self._refuse_headers()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._between = True
        if not self._refused:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refusal is not None and not self.pipeline:
            if self.cycle is None or self.cycle.response_complete:
                refusal, self._refusal = self._refusal, None
                self._answer(*refusal)

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers bytes that are no HTTP request at once, and closes:
        # the answer to a request sent before them, still being made, was lost,
        # though the request was carried out.
        self._refuse(b"HTTP/1.1 400 Bad Request\r\n", msg.encode("ascii", "replace"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._headers_deadline is None:
            self._headers_deadline = self.loop.call_later(
                self.headers_seconds, self._too_slow
            )

    def _disarm(self) -> None:
        if self._headers_deadline is not None:
            self._headers_deadline.cancel()
            self._headers_deadline = None

    def _refuse_headers(self) -> None:
        logger.info(
            "refused a request whose headers passed %d bytes",
            MAX_HEADER_BYTES,
            extra={"action": "http.headers_too_large"},
        )
        self._refuse(b"HTTP/1.1 431 Request Header Fields Too Large\r\n", _TOO_LARGE)

    def _refuse(self, status_line: bytes, text: bytes) -> None:
        """Answer ``status_line`` and close, after the answers to the requests
        before the refused one."""
        self._refused = True
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            # A request before it is still being answered; its answer goes first.
            self._refusal = (status_line, text)
            self.flow.pause_reading()
            return
        self._answer(status_line, text)

    def _answer(self, status_line: bytes, text: bytes) -> None:
        response = [status_line]
        for name, value in self.server_state.default_headers:
            response += [name, b": ", value, b"\r\n"]
        response += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(text),
            b"connection: close\r\n\r\n",
            text,
        ]
        self.transport.write(b"".join(response))
        # Closed with requests still unread, the socket would answer them with a
        # reset, which can destroy the answers still on their way to the client.
        # So the connection is shut for writing, and what the client still sends
        # is read and dropped until it closes its end, or for a moment at most.
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.flow.resume_reading()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()

    def _too_slow(self) -> None:
        self._headers_deadline = None
        if not self.transport.is_closing():
            logger.debug(
                "closing a connection whose request headers did not arrive in %gs",
                self.headers_seconds,
                extra={"action": "http.headers_timeout"},
            )
            self.transport.close()


def headers_in_time(seconds: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing connections whose request headers
    take longer than ``seconds``; for ``uvicorn.Config(http=...)``."""
    return type("HeadersInTime", (_HeadersInTime,), {"headers_seconds": seconds})
