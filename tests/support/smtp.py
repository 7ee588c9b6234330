"""An SMTP server for tests that fails on demand and records what it received.

It runs aiosmtpd in a thread of its own, so it answers while the test's event loop
awaits. Each new connection takes the next behaviour from a script (``then``); once
the script is used up, every connection gets the default behaviour:

* ``accept``: take the message and record it in :attr:`SmtpServer.received`;
* ``tempfail``: answer DATA with a 451;
* ``reject``: refuse the recipient with a 550;
* ``hang``: accept the TCP connection and never send the greeting;
* ``drop``: read the whole message, record it in :attr:`SmtpServer.dropped`, then
  close the connection before answering, so the client cannot know it arrived.

:attr:`SmtpServer.data_delay` makes every DATA slow, to hold messages in flight;
:attr:`SmtpServer.slow_for` makes it slow only for some recipients.
Addresses in :attr:`SmtpServer.unknown` are refused with a 550 whatever the
behaviour, as a real server refuses a mailbox that does not exist.

It offers PIPELINING, as Postfix and Exim do, unless made with ``pipelining=False``.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support.processes import free_port

Behaviour = Literal["accept", "tempfail", "reject", "hang", "drop"]


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    # time.monotonic() when the server answered DATA
    at: float = field(default_factory=time.monotonic)

    @property
    def message_id(self) -> str:
        return str(self.message()["Message-ID"])

    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.data, policy=email.policy.default)


class _Protocol(SMTP):
    behaviour: Behaviour = "accept"

    async def _handle_client(self) -> None:
        server: SmtpServer = self.event_handler
        self.behaviour = server.next_behaviour()
        if self.behaviour == "hang":
            # Say nothing until the client gives up or the server stops.
            server.hanging.add(self)
            try:
                while not (server.stopping or self._reader.at_eof()):
                    await asyncio.sleep(0.05)
            finally:
                server.hanging.discard(self)
                if self.transport is not None:
                    self.transport.close()
            return
        server.open.add(self)
        try:
            await super()._handle_client()
        finally:
            server.open.discard(self)


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _Protocol(self.handler, **self.SMTP_kwargs)


class OffersPipelining:
    """An aiosmtpd handler that offers PIPELINING (RFC 2920) while
    :attr:`pipelining` is true. aiosmtpd reads commands line by line, so it takes
    pipelined ones as they come; it only never says so itself."""

    pipelining = True
    # The name each client gave in EHLO, in order.
    helo_names: list[str]

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # aiosmtpd leaves the session's host name to a handler with this hook.
        session.host_name = hostname
        self.helo_names.append(hostname)
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses


class SmtpServer(OffersPipelining):
    """Start with ``with SmtpServer() as smtp:``; point NOTIFLOW_SMTP_PORT at it."""

    def __init__(
        self, default: Behaviour = "accept", *, pipelining: bool = True
    ) -> None:
        self.default: Behaviour = default
        self.pipelining = pipelining
        self.helo_names = []
        self.port = free_port()
        self.received: list[Received] = []
        self.dropped: list[Received] = []
        self.unknown: set[str] = set()
        self.connections = 0
        self.data_delay = 0.0
        # Seconds DATA takes for a message to one of these recipients.
        self.slow_for: dict[str, float] = {}
        self.stopping = False
        self.hanging: set[SMTP] = set()
        self.open: set[SMTP] = set()
        self._script: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._controller = _Controller(self, hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> SmtpServer:
        self._controller.start()
        # aiosmtpd connects once to check that the server answers; not a client.
        with self._lock:
            self.connections = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping = True
        # Let hanging connections see the flag and close before the loop stops.
        deadline = time.monotonic() + 2
        while self.hanging and time.monotonic() < deadline:
            time.sleep(0.02)
        self._controller.stop()

    def then(self, *behaviours: Behaviour) -> SmtpServer:
        """The next connections behave like this, in order."""
        with self._lock:
            self._script.extend(behaviours)
        return self

    def next_behaviour(self) -> Behaviour:
        with self._lock:
            self.connections += 1
            return self._script.popleft() if self._script else self.default

    def close_connections(self) -> None:
        """Close every open client connection, as a server's idle timeout does."""
        for protocol in list(self.open):
            loop = protocol.loop
            if protocol.transport is not None:
                loop.call_soon_threadsafe(protocol.transport.close)

    def first_arrivals(self) -> dict[str, float]:
        """When the first copy of each Message-ID arrived (time.monotonic())."""
        first: dict[str, float] = {}
        with self._lock:
            for record in self.received:
                first.setdefault(record.message_id, record.at)
        return first

    def message_ids(self) -> Counter[str]:
        with self._lock:
            return Counter(r.message_id for r in self.received)

    def to(self, address: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if address in r.rcpt_tos]

    # aiosmtpd handler hooks

    async def handle_RCPT(
        self,
        server: _Protocol,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address in self.unknown or server.behaviour == "reject":
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(
        self, server: _Protocol, session: Session, envelope: Envelope
    ) -> str:
        record = Received(
            mail_from=str(envelope.mail_from),
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=_bytes(envelope.original_content or envelope.content),
        )
        delay = max(
            [self.data_delay, *(self.slow_for.get(r, 0.0) for r in envelope.rcpt_tos)]
        )
        if delay:
            await asyncio.sleep(delay)
        if server.behaviour == "tempfail":
            return "451 4.3.0 try again later"
        if server.behaviour == "drop":
            with self._lock:
                self.dropped.append(record)
            if server.transport is not None:
                server.transport.abort()
            return "250 OK"
        with self._lock:
            self.received.append(record)
        return "250 OK"


def _bytes(content: Any) -> bytes:
    return content if isinstance(content, bytes) else str(content).encode()


class SlowServer:
    """An SMTP server, one command at a time, that answers every command after
    ``command_delay`` seconds and the end of the content after ``content_delay``,
    counting the messages whose content it took whole.

    It may also, as real relays do, answer 421 to the greeting of a connection
    beyond ``most_connections`` open at once, and to MAIL once a connection has
    carried ``messages_per_connection``.
    """

    def __init__(
        self,
        command_delay: float = 0,
        content_delay: float = 0,
        *,
        most_connections: int | None = None,
        messages_per_connection: int | None = None,
    ) -> None:
        self.command_delay = command_delay
        self.content_delay = content_delay
        self.most_connections = most_connections
        self.messages_per_connection = messages_per_connection
        self.taken = 0
        self.open = 0
        self.most_open = 0
        self.turned_away = 0
        self._listener: asyncio.Server | None = None

    async def __aenter__(self) -> SlowServer:
        self._listener = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._listener is not None
        self._listener.close()

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.sockets[0].getsockname()[1])

    async def _answer(self, writer: asyncio.StreamWriter, reply: bytes) -> None:
        await asyncio.sleep(self.command_delay)
        writer.write(reply)
        await writer.drain()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.most_connections is not None and self.open >= self.most_connections:
            self.turned_away += 1
            writer.write(b"421 4.7.0 too many connections from your host\r\n")
            writer.close()
            return
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        carried = 0
        try:
            await self._answer(writer, b"220 slow.example ready\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"MAIL" and carried == self.messages_per_connection:
                    writer.write(b"421 4.7.0 too many messages, closing\r\n")
                    break
                if verb == b"EHLO":
                    await self._answer(writer, b"250 slow.example\r\n")
                elif verb == b"DATA":
                    await self._answer(writer, b"354 go ahead\r\n")
                    await reader.readuntil(b"\r\n.\r\n")
                    self.taken += 1
                    carried += 1
                    await asyncio.sleep(self.content_delay)
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    await self._answer(writer, b"250 ok\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()
