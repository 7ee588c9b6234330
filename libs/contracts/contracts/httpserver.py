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
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)


class _HeadersInTime(HttpToolsProtocol):
    headers_seconds: float = 20.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_deadline: asyncio.TimerHandle | None = None

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
        if self._headers_deadline is not None:
            self._headers_deadline.cancel()
            self._headers_deadline = None

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
