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

Nor does anything bound the headers' size: the parser keeps a header's value in
memory until it ends, and a single header of 50 MB, quick enough for the deadline,
took a process's memory up by 90 MB. A request whose line and headers pass
:data:`MAX_HEADER_BYTES` is answered ``431`` and its connection closed.
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


class _HeadersInTime(HttpToolsProtocol):
    headers_seconds: float = 20.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_deadline: asyncio.TimerHandle | None = None
        # Bytes read while a request's headers were still coming: counted by
        # the read, so a read that also held a request before it counts that too.
        self._header_bytes = 0

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._headers_deadline is None or self.transport.is_closing():
            return  # no request's headers under way
        self._header_bytes += len(data)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse_headers()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._headers_deadline is None:
            self._headers_deadline = self.loop.call_later(
                self.headers_seconds, self._too_slow
            )

    def _disarm(self) -> None:
        self._header_bytes = 0
        if self._headers_deadline is not None:
            self._headers_deadline.cancel()
            self._headers_deadline = None

    def _refuse_headers(self) -> None:
        self._disarm()
        logger.info(
            "refused a request whose headers passed %d bytes",
            MAX_HEADER_BYTES,
            extra={"action": "http.headers_too_large"},
        )
        response = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        for name, value in self.server_state.default_headers:
            response += [name, b": ", value, b"\r\n"]
        response += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(_TOO_LARGE),
            b"connection: close\r\n\r\n",
            _TOO_LARGE,
        ]
        self.transport.write(b"".join(response))
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
