"""An SMTP server that only notes when each notification's email arrived.

It keeps no message: a run at a few hundred emails a second would otherwise fill
memory or the disk. aiosmtpd serves it from a thread of its own, so its event loop
competes with the load generator's only for the GIL, and the arrival time is taken
on the same ``perf_counter`` clock as the send schedule.

It offers PIPELINING (RFC 2920), as Postfix and Exim do, so the email sender sends
MAIL, RCPT and DATA in one write as it would to a real relay; aiosmtpd reads
commands line by line from a buffered stream, so it takes them that way.
``pipelining=False`` makes it a server that takes one command at a time.
"""

from __future__ import annotations

import re
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support.smtp import OffersPipelining

# The email sender writes the notification id as a header and in the Message-ID.
_ID = re.compile(rb"X-Notiflow-Notification-Id:\s*(\d+)|<notification-(\d+)@", re.I)


class CountingSink(OffersPipelining):
    """Start with ``with CountingSink(port) as sink:``; read :attr:`arrivals`."""

    def __init__(self, port: int, pipelining: bool = True) -> None:
        self.port = port
        self.pipelining = pipelining
        # (notification id, perf_counter at DATA); list.append is atomic under the
        # GIL, and the reader only takes slices of it.
        self.arrivals: list[tuple[int, float]] = []
        self.unparsed = 0
        self._controller = Controller(
            self, hostname="127.0.0.1", port=port, ready_timeout=10
        )

    def __enter__(self) -> CountingSink:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        now = time.perf_counter()
        content = envelope.original_content or b""
        match = _ID.search(content if isinstance(content, bytes) else b"")
        if match is None:
            self.unparsed += 1
        else:
            self.arrivals.append((int(match.group(1) or match.group(2)), now))
        return "250 OK"
