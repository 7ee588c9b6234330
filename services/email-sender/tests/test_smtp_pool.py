"""Kept SMTP connections, against a real SMTP server, pipelined or not.

Each behaviour runs against a server that offers PIPELINING (RFC 2920) and one that
does not, unless it is about one of the two. The server records every read it
makes from a client, so a test can tell whether MAIL, RCPT and DATA came in one
write and whether content came before DATA was answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import logging
import ssl
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from email_sender.app import EmailSettings
from email_sender.mime import Mail, build
from email_sender.smtp import (
    NoConnection,
    PermanentSendError,
    SmtpConfig,
    SmtpPool,
    TransientSendError,
)
from tests.support.smtp import SlowServer, SmtpServer, _Protocol
from tests.support.waiting import eventually

MODES = ["pipelining", "one command at a time"]


class _RecordingProtocol(_Protocol):
    event_handler: Server

    def data_received(self, data: bytes) -> None:
        self.event_handler.reads.append(data)
        super().data_received(data)

    async def smtp_RCPT(self, arg: str) -> None:
        if await self._hung_up("RCPT") or await self._refused_batch():
            return
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        server = self.event_handler
        if await self._hung_up("DATA") or await self._refused_batch():
            return
        if server.data_reply is not None and self.envelope.rcpt_tos:
            await self.push(server.data_reply)
            return
        if server.data_despite_refusals and not self.envelope.rcpt_tos:
            # Breaks RFC 2920: 354 although no recipient was accepted. Whatever
            # content comes is recorded as sent to nobody.
            self.envelope.rcpt_tos.append("nobody@example.com")
        await super().smtp_DATA(arg)

    async def _refused_batch(self) -> bool:
        """Answer 503 to a command that came in one read with MAIL, if scripted."""
        server = self.event_handler
        batch = server.reads[-1] if server.reads else b""
        if server.refuses_batches and batch.startswith(b"MAIL"):
            if batch.count(b"\r\n") > 1:
                await self.push("503 5.5.1 Error: bad sequence of commands")
                return True
        return False

    async def _hung_up(self, command: str) -> bool:
        """Close without answering ``command``, or go silent, if scripted."""
        server = self.event_handler
        if server.silent_at == command:
            while not server.stopping:
                await asyncio.sleep(0.05)
            return True
        if command in server.hang_up_at:
            server.hang_up_at.remove(command)
            if self.transport is not None:
                self.transport.close()
            return True
        return False


class _RecordingController(Controller):
    def factory(self) -> SMTP:
        return _RecordingProtocol(self.handler, **self.SMTP_kwargs)


class Server(SmtpServer):
    """The tests' SMTP server, with PIPELINING offered or not, recording its reads.

    On top of what :class:`SmtpServer` scripts:

    * :attr:`replies`: an address in MAIL or RCPT answered with this reply;
    * :attr:`data_reply`: DATA answered with this instead of 354;
    * :attr:`data_despite_refusals`: DATA answered 354 with every recipient refused;
    * :attr:`hang_up_at`: close the connection on this command, unanswered, once;
    * :attr:`silent_at`: never answer this command;
    * :attr:`refuses_batches`: RCPT and DATA that came in one write with MAIL
      answered 503, though PIPELINING is offered.
    """

    def __init__(
        self,
        *,
        pipelining: bool,
        smtputf8: bool = True,
        starttls: ssl.SSLContext | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(pipelining=pipelining)
        self.reads: list[bytes] = []
        self.mail_options: list[list[str]] = []
        self.replies: dict[str, str] = {}
        self.data_reply: str | None = None
        self.data_despite_refusals = False
        self.hang_up_at: list[str] = []
        self.silent_at: str | None = None
        self.refuses_batches = False
        # In place of the controller SmtpServer made, never started: this one's
        # connections record their reads.
        self._controller.loop.close()
        self._controller = _RecordingController(
            self,
            hostname="127.0.0.1",
            port=self.port,
            ssl_context=tls,
            enable_SMTPUTF8=smtputf8,
            tls_context=starttls,
        )

    def __enter__(self) -> Server:
        super().__enter__()
        self.reads.clear()
        return self

    def commands(self) -> list[bytes]:
        """Each read from clients, but for EHLO, STARTTLS and QUIT."""
        skipped = (b"EHLO", b"STARTTLS", b"QUIT")
        return [r for r in self.reads if not r.startswith(skipped)]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if address in self.replies:
            return self.replies[address]
        self.mail_options.append(list(mail_options))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: _Protocol,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address in self.replies:
            return self.replies[address]
        return await super().handle_RCPT(
            server, session, envelope, address, rcpt_options
        )


def message(n: int, *recipients: str) -> Mail:
    mail = build(
        notification_id=n,
        to_address=f"user{n}@example.com",
        to_name="User",
        subject=f"note {n}",
        text="hello",
        html=None,
        sender="n@example.com",
        sender_name="notiflow",
        domain="example.com",
    )
    if recipients:
        mail = dataclasses.replace(mail, recipients=recipients)
    return mail


def as_sent(data: bytes) -> bytes:
    """``data`` as a server keeps it: SMTP content always ends with a line end."""
    return data if data.endswith(b"\r\n") else data + b"\r\n"


@pytest.fixture(params=MODES)
def server(request: pytest.FixtureRequest):
    with Server(pipelining=request.param == "pipelining") as smtp:
        yield smtp


@pytest.fixture
def pipelining_server():
    with Server(pipelining=True) as smtp:
        yield smtp


def pool(server: SmtpServer, size: int = 2, timeout: float = 2) -> SmtpPool:
    return SmtpPool(SmtpConfig("127.0.0.1", server.port, timeout=timeout), size=size)


async def send_all(server: SmtpServer, *mails: Mail, size: int = 2) -> None:
    transport = pool(server, size)
    try:
        for mail in mails:
            await transport.send(mail)
    finally:
        await transport.close()


# What the pool promised before pipelining, in both modes


async def test_messages_in_a_row_share_one_connection(server: Server) -> None:
    await send_all(server, *(message(n) for n in range(5)))

    assert len(server.received) == 5
    assert server.connections == 1


async def test_the_sender_names_itself_in_ehlo_as_configured(server: Server) -> None:
    config = SmtpConfig(
        "127.0.0.1", server.port, timeout=2, helo_name="mail.example.org"
    )
    transport = SmtpPool(config, size=1)
    try:
        await transport.send(message(1))
    finally:
        await transport.close()

    assert server.helo_names == ["mail.example.org"]
    assert len(server.received) == 1


async def test_a_connection_closed_by_the_server_is_replaced(server: Server) -> None:
    transport = pool(server)
    try:
        await transport.send(message(1))
        server.close_connections()
        await eventually(lambda: _closed(server), what="server closed the connection")

        await transport.send(message(2))
    finally:
        await transport.close()

    assert [r.message_id for r in server.received] == [
        "<notification-1@example.com>",
        "<notification-2@example.com>",
    ]
    assert server.connections == 2


async def test_a_failed_message_does_not_leave_its_connection_behind(
    server: Server,
) -> None:
    server.then("tempfail")
    transport = pool(server)
    try:
        with pytest.raises(TransientSendError, match="451"):
            await transport.send(message(1))
        await transport.send(message(2))
    finally:
        await transport.close()

    assert [r.message_id for r in server.received] == ["<notification-2@example.com>"]
    assert server.connections == 2


# Delivery, byte for byte


async def test_a_message_arrives_byte_for_byte(server: Server) -> None:
    mail = message(1)
    dotted = b"Subject: dots\r\n\r\n.starts with a dot\r\n..two\r\n.\r\nend\r\n"

    await send_all(server, mail, dataclasses.replace(mail, data=dotted))

    assert [r.data for r in server.received] == [as_sent(mail.data), dotted]
    assert server.received[0].mail_from == "n@example.com"
    assert server.received[0].rcpt_tos == ("user1@example.com",)


async def test_non_ascii_addresses_and_content_go_with_smtputf8(
    server: Server,
) -> None:
    data = "Subject: Grüße\r\nFrom: jörg@exämple.com\r\n\r\n.ä\r\nbody\r\n".encode()
    mail = Mail("jörg@exämple.com", ("zoë@exämple.com",), data, "<n@example.com>")

    await send_all(server, mail)

    [received] = server.received
    assert received.mail_from == "jörg@exämple.com"
    assert received.rcpt_tos == ("zoë@exämple.com",)
    assert received.data == data
    assert set(server.mail_options[0]) >= {"SMTPUTF8", "BODY=8BITMIME"}


async def test_a_non_ascii_address_is_refused_for_good_without_smtputf8() -> None:
    mail = dataclasses.replace(message(1), recipients=("zoë@exämple.com",))
    with Server(pipelining=True, smtputf8=False) as smtp:
        with pytest.raises(PermanentSendError, match="SMTPUTF8"):
            await send_all(smtp, mail)

        assert smtp.received == []
        assert smtp.commands() == []


async def test_every_recipient_gets_one_copy(server: Server) -> None:
    mail = message(1, "a@example.com", "b@example.com", "c@example.com")

    await send_all(server, mail)

    [received] = server.received
    assert received.rcpt_tos == ("a@example.com", "b@example.com", "c@example.com")


# Refusals, sorted as before, and the connection dropped


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ("450 4.2.1 mailbox busy", TransientSendError),
        ("550 5.1.1 no such user", PermanentSendError),
    ],
)
async def test_a_refused_recipient_among_several_fails_the_message(
    server: Server, reply: str, error: type[Exception]
) -> None:
    server.replies["b@example.com"] = reply

    with pytest.raises(error, match=reply[:3]):
        await send_all(server, message(1, "a@example.com", "b@example.com"))
    await send_all(server, message(2))

    # As aiosmtplib's sendmail does, the others still get it.
    assert [r.rcpt_tos for r in server.received] == [
        ("a@example.com",),
        ("user2@example.com",),
    ]
    assert server.connections == 2


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ("451 4.3.0 sender check failed", TransientSendError),
        ("553 5.7.1 sender not allowed", PermanentSendError),
        # The session's settings, not the message: a login the relay wants.
        ("530 5.7.0 Authentication required", TransientSendError),
    ],
)
async def test_a_refused_sender_fails_the_message(
    server: Server, reply: str, error: type[Exception]
) -> None:
    server.replies["n@example.com"] = reply
    transport = pool(server)
    try:
        with pytest.raises(error, match=reply[:3]):
            await transport.send(message(1))
        del server.replies["n@example.com"]
        await transport.send(message(2))
    finally:
        await transport.close()

    assert [r.message_id for r in server.received] == ["<notification-2@example.com>"]
    assert server.connections == 2


async def test_every_recipient_refused_is_sorted_by_the_recipients_replies(
    server: Server,
) -> None:
    server.replies["a@example.com"] = "450 4.2.1 mailbox busy"
    server.replies["b@example.com"] = "550 5.1.1 no such user"
    transport = pool(server)
    try:
        with pytest.raises(PermanentSendError, match="550"):
            await transport.send(message(1, "a@example.com", "b@example.com"))
        await transport.send(message(2))
    finally:
        await transport.close()

    assert [r.message_id for r in server.received] == ["<notification-2@example.com>"]
    assert server.connections == 2


async def test_no_content_follows_when_every_recipient_was_refused(
    pipelining_server: Server,
) -> None:
    server = pipelining_server
    server.replies["a@example.com"] = "550 5.1.1 no such user"
    server.data_despite_refusals = True

    with pytest.raises(PermanentSendError, match="550"):
        await send_all(server, message(1, "a@example.com"))
    await eventually(lambda: _closed(server), what="client closed the connection")

    assert server.received == []
    [envelope] = server.commands()
    assert envelope.endswith(b"DATA\r\n")


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ("451 4.3.0 queue full", TransientSendError),
        ("554 5.7.1 not from you", PermanentSendError),
        # A stale reply out of step with the commands: said so, and retried.
        ("250 2.0.0 stale", TransientSendError),
    ],
)
async def test_a_refused_data_command_fails_the_message(
    server: Server, reply: str, error: type[Exception]
) -> None:
    server.data_reply = reply
    transport = pool(server)
    try:
        with pytest.raises(error, match=reply[:3]):
            await transport.send(message(1))
        server.data_reply = None
        await transport.send(message(2))
    finally:
        await transport.close()

    assert [r.message_id for r in server.received] == ["<notification-2@example.com>"]
    assert server.connections == 2


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        ("greeting", "554"),
        ("EHLO and HELO", "550"),
        ("login", "535"),
    ],
)
async def test_a_server_refusing_the_session_fails_its_emails_for_now(
    refusal: str, code: str
) -> None:
    # Such a refusal is the server's or its settings', the same for every email:
    # a wrong password, a relay out of service. The emails wait for it to pass.
    served = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            await converse(reader, writer)
        finally:
            writer.close()
            served.set()

    async def converse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if refusal == "greeting":
            writer.write(b"554 5.3.2 no service here\r\n")
        else:
            writer.write(b"220 ready\r\n")
            while line := await reader.readline():
                verb = line.split()[0].upper() if line.split() else b""
                if verb in (b"EHLO", b"HELO") and refusal == "EHLO and HELO":
                    writer.write(b"550 5.7.1 not from your network\r\n")
                elif verb == b"EHLO":
                    writer.write(b"250-mx.example.com\r\n250 AUTH PLAIN LOGIN\r\n")
                elif verb == b"AUTH":
                    writer.write(b"535 5.7.8 authentication credentials invalid\r\n")
                else:
                    writer.write(b"221 bye\r\n")
                    break
        await writer.drain()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    config = SmtpConfig(
        "127.0.0.1", port, timeout=2, username="notiflow", password="wrong"
    )
    transport = SmtpPool(config, size=1)
    try:
        with pytest.raises(TransientSendError, match=f"session.*{code}"):
            await transport.send(message(1))
        await asyncio.wait_for(served.wait(), 5)
    finally:
        await transport.close()
        listener.close()
        await listener.wait_closed()


# A server that goes away or goes quiet


@pytest.mark.parametrize("command", ["RCPT", "DATA"])
async def test_a_new_connection_closed_mid_transaction_fails_for_now(
    server: Server, command: str
) -> None:
    server.hang_up_at.append(command)

    with pytest.raises(TransientSendError, match="connection failed"):
        await send_all(server, message(1))
    await send_all(server, message(2))

    assert [r.message_id for r in server.received] == ["<notification-2@example.com>"]
    assert server.connections == 2


async def test_a_kept_connection_closed_mid_transaction_is_replaced(
    server: Server,
) -> None:
    transport = pool(server)
    try:
        await transport.send(message(1))
        server.hang_up_at.append("RCPT")
        await transport.send(message(2))
    finally:
        await transport.close()

    assert [r.message_id for r in server.received] == [
        "<notification-1@example.com>",
        "<notification-2@example.com>",
    ]
    assert server.connections == 2


async def test_a_kept_connection_lost_after_the_content_is_not_sent_again_at_once(
    server: Server,
) -> None:
    # The server takes the email, then drops the connection without its reply:
    # it may have the email, so only a later retry may send it again.
    transport = pool(server)
    try:
        await transport.send(message(1))
        for connection in list(server.open):
            connection.behaviour = "drop"
        with pytest.raises(TransientSendError, match="may have taken the email"):
            await transport.send(message(2))
    finally:
        await transport.close()

    assert [r.message_id for r in server.received] == ["<notification-1@example.com>"]
    assert [r.message_id for r in server.dropped] == ["<notification-2@example.com>"]
    assert server.connections == 1


async def test_a_server_that_stops_answering_is_given_up_on_in_time(
    server: Server,
) -> None:
    server.silent_at = "RCPT"
    transport = pool(server, timeout=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(TransientSendError, match="SMTP timeout"):
            await transport.send(message(1))
    finally:
        await transport.close()

    assert time.monotonic() - started < SmtpConfig("", 0, 0.5).deadline + 1
    assert server.received == []


async def test_a_slow_reply_to_the_content_is_waited_for_and_the_email_sent_once(
    server: Server,
) -> None:
    # The server stores the email, then answers later than any other command may.
    server.data_delay = 1.0
    config = SmtpConfig("127.0.0.1", server.port, timeout=0.3, data_timeout=10)
    transport = SmtpPool(config, size=1)
    try:
        await transport.send(message(1))
        await transport.send(message(2))
    finally:
        await transport.close()

    assert list(server.message_ids().values()) == [1, 1]
    assert server.connections == 1


async def test_a_reply_to_the_content_later_than_its_own_timeout_is_tried_again(
    server: Server,
) -> None:
    # The server may have stored the email: a retry may send it twice.
    server.data_delay = 1.5
    config = SmtpConfig("127.0.0.1", server.port, timeout=0.2, data_timeout=0.5)
    transport = SmtpPool(config, size=1)
    try:
        with pytest.raises(TransientSendError, match="SMTP timeout") as failed:
            await transport.send(message(1))
    finally:
        await transport.close()

    assert "may have taken the email" in str(failed.value)


async def test_the_reply_to_the_content_gets_its_whole_wait_after_slow_commands() -> (
    None
):
    # Five replies before the content, each within its timeout, take longer than
    # 4 x timeout; the lease leaves time for them and for the content's reply.
    async with SlowServer(command_delay=0.9, content_delay=1.8) as server:
        config = SmtpConfig("127.0.0.1", server.port, timeout=1, data_timeout=2)
        transport = SmtpPool(config, size=1)
        try:
            await transport.send(message(1), ends_by=time.monotonic() + 8)
        finally:
            await transport.close()

    assert server.taken == 1


async def test_a_kept_connection_closed_after_its_quota_sends_again_at_once() -> None:
    # As Exchange's MaxMessagesPerConnection does: 421 to the next MAIL.
    async with SlowServer(messages_per_connection=2) as server:
        transport = SmtpPool(SmtpConfig("127.0.0.1", server.port, timeout=2), size=1)
        try:
            for n in range(5):
                await transport.send(message(n))
        finally:
            await transport.close()

    assert server.taken == 5


async def test_a_server_refusing_one_connection_too_many_is_kept_to_what_it_took(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mails = [message(n) for n in range(12)]
    async with SlowServer(0.05, 0.05, most_connections=3) as server:
        transport = SmtpPool(SmtpConfig("127.0.0.1", server.port, timeout=2), size=12)
        try:
            with caplog.at_level(logging.WARNING, logger="email_sender.smtp"):
                await asyncio.gather(*(transport.send(mail) for mail in mails))
                # Later emails keep to the limit learnt, none turned away.
                turned_away = server.turned_away
                await asyncio.gather(*(transport.send(mail) for mail in mails))
        finally:
            await transport.close()

    assert server.taken == 24, "every email sent, none failed"
    assert server.most_open == 3
    assert server.turned_away == turned_away
    said = [r for r in caplog.records if r.action == "smtp.connections_limited"]  # type: ignore[attr-defined]
    assert len(said) == 1
    assert "while 3 of this sender's were open" in said[0].getMessage()


async def test_a_relay_refusing_every_connection_after_its_limit_was_learnt_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with SlowServer(0.05, 0.05, most_connections=2) as server:
        transport = SmtpPool(SmtpConfig("127.0.0.1", server.port, timeout=1), size=6)
        try:
            await asyncio.gather(*(transport.send(message(n)) for n in range(6)))
            server.most_connections = 0  # out of service now, for every connection
            await transport.close()  # and the connections kept are gone
            with caplog.at_level(logging.WARNING, logger="email_sender.smtp"):
                with pytest.raises(TransientSendError) as failed:
                    await transport.send(message(9))
        finally:
            await transport.close()

    # Told as an outage, and counted as an attempt: not a wait for a free one.
    assert not isinstance(failed.value, NoConnection)
    assert "421" in failed.value.reason
    said = [r.action for r in caplog.records]  # type: ignore[attr-defined]
    assert "smtp.unreachable" in said


async def test_a_login_without_tls_from_the_start_waits_for_starttls(
    server: Server,
) -> None:
    # The settings ask for STARTTLS whenever there is a password to send.
    settings = EmailSettings(smtp_username="mailer", smtp_password="secret")
    config = SmtpConfig(
        "127.0.0.1",
        server.port,
        timeout=2,
        username="mailer",
        password="secret",
        start_tls=settings.start_tls,
    )
    transport = SmtpPool(config, size=1)
    try:
        with pytest.raises(TransientSendError, match="STARTTLS"):
            await transport.send(message(1))
    finally:
        await transport.close()

    assert not any(read.upper().startswith(b"AUTH") for read in server.reads)
    assert server.received == []


async def test_commands_too_slow_for_the_time_left_send_no_content() -> None:
    async with SlowServer(command_delay=0.9, content_delay=0) as server:
        config = SmtpConfig("127.0.0.1", server.port, timeout=1, data_timeout=2)
        transport = SmtpPool(config, size=1)
        try:
            with pytest.raises(TransientSendError, match="which was not sent"):
                await transport.send(message(1))
        finally:
            await transport.close()

    assert server.taken == 0


# How the commands travel


async def test_mail_rcpt_and_data_arrive_in_one_write_when_offered(
    pipelining_server: Server,
) -> None:
    server = pipelining_server
    mail = message(1, "a@example.com", "b@example.com")

    await send_all(server, mail)

    envelope, content = server.commands()
    assert envelope.startswith(b"MAIL FROM:<n@example.com>")
    assert b"\r\nRCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n" in envelope
    # The content waits for the 354 to DATA.
    assert envelope.endswith(b"\r\nDATA\r\n")
    assert content == as_sent(mail.data) + b".\r\n"


async def test_a_message_takes_two_round_trips_pipelined_and_four_otherwise() -> None:
    mails = [message(n) for n in range(3)]
    reads = {}
    for pipelining in (True, False):
        with Server(pipelining=pipelining) as smtp:
            await send_all(smtp, *mails)
            assert len(smtp.received) == 3
            reads[pipelining] = len(smtp.commands())

    assert reads == {True: 2 * 3, False: 4 * 3}


async def test_a_server_refusing_the_batches_it_offered_gets_one_command_at_a_time(
    pipelining_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    server = pipelining_server
    server.refuses_batches = True
    mails = [message(n, f"a{n}@example.com", f"b{n}@example.com") for n in range(3)]

    with caplog.at_level(logging.WARNING, logger="email_sender.smtp"):
        await send_all(server, *mails)

    # Each arrives once; the first was sent again at once, after the refusal.
    sent = {f"<notification-{n}@example.com>": 1 for n in range(3)}
    assert server.message_ids() == sent
    [batch, *after] = server.commands()
    assert batch.count(b"\r\n") == 4  # MAIL, two RCPT, DATA
    assert len(after) == 5 * 3  # MAIL, RCPT, RCPT, DATA, content: each alone
    assert all(read.count(b"\r\n") == 1 for read in after[:4])
    warned = [r for r in caplog.records if r.action == "smtp.pipelining_refused"]  # type: ignore[attr-defined]
    assert len(warned) == 1
    assert "503" in warned[0].getMessage()


async def test_a_bad_sequence_reply_is_tried_again_later_not_given_up(
    server: Server,
) -> None:
    # 503 says the conversation went wrong, not that the address or the
    # message is refused for good.
    server.replies["a@example.com"] = "503 5.5.1 Error: need MAIL command"

    with pytest.raises(TransientSendError, match="503"):
        await send_all(server, message(1, "a@example.com"))

    assert server.received == []


async def test_replies_that_arrive_together_or_in_pieces_are_each_read() -> None:
    # Postfix sends the replies to MAIL and RCPT as one unit, and a reply may
    # be cut anywhere between two segments; aiosmtpd does neither.
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        writer.write(b"220 ready\r\n")
        await reader.readline()
        writer.write(b"250-mx.example.com\r\n250-PIPELINING\r\n250 SIZE 100000\r\n")
        await reader.readuntil(b"DATA\r\n")
        writer.write(b"250 2.1.0 sender ok\r\n250-2.1.5 recipient\r\n250 2.1.5 ok\r\n")
        writer.write(b"354 go ahead\r\n")
        await reader.readuntil(b"\r\n.\r\n")
        writer.write(b"25")
        await writer.drain()
        await asyncio.sleep(0.05)  # so that the rest comes in a segment of its own
        writer.write(b"0 2.0.0 queued as 4Fq\r\n")
        await reader.readline()
        writer.write(b"221 bye\r\n")
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    transport = SmtpPool(SmtpConfig("127.0.0.1", port, timeout=2), size=1)
    try:
        reply = await transport.send(message(1))
    finally:
        await transport.close()
        listener.close()
        await listener.wait_closed()

    assert reply == "2.0.0 queued as 4Fq"


@pytest.mark.parametrize("tls", ["STARTTLS", "TLS from the start"])
async def test_pipelining_works_over_tls(
    tls: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_context = _self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
    implicit = tls == "TLS from the start"
    options = {"tls": server_context} if implicit else {"starttls": server_context}
    mails = [message(n) for n in range(3)]

    with Server(pipelining=True, **options) as smtp:
        config = SmtpConfig("127.0.0.1", smtp.port, timeout=2, use_tls=implicit)
        transport = SmtpPool(config, size=1)
        try:
            for mail in mails:
                await transport.send(mail)
        finally:
            await transport.close()

        assert [r.data for r in smtp.received] == [as_sent(m.data) for m in mails]
        assert smtp.connections == 1
        assert len(smtp.commands()) == 2 * len(mails)


def _self_signed(directory: Path) -> ssl.SSLContext:
    """A server context whose certificate, for 127.0.0.1, is in ``cert.pem``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


async def _closed(server: SmtpServer) -> bool:
    return not server.open


async def test_a_server_that_cannot_be_reached_is_warned_of_once_and_its_return_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with SmtpServer() as later:
        port = later.port
    transport = SmtpPool(SmtpConfig("127.0.0.1", port, timeout=2), size=1)
    try:
        with caplog.at_level(logging.INFO, logger="email_sender.smtp"):
            for n in range(3):
                with pytest.raises(TransientSendError):
                    await transport.send(message(n))
            with SmtpServer() as back:
                # The same pool, now finding a server where it looks.
                transport._config = SmtpConfig("127.0.0.1", back.port, timeout=2)
                await transport.send(message(9))
    finally:
        await transport.close()

    said = [(r.levelno, r.action) for r in caplog.records]  # type: ignore[attr-defined]
    assert said == [
        (logging.WARNING, "smtp.unreachable"),
        (logging.INFO, "smtp.reachable"),
    ]


async def test_a_success_in_answer_to_data_says_the_replies_are_out_of_step(
    server: Server,
) -> None:
    server.data_reply = "250 2.0.0 stale"
    transport = pool(server)
    try:
        with pytest.raises(TransientSendError, match="out of step") as failed:
            await transport.send(message(1))
    finally:
        await transport.close()

    assert "where 354 was due" in failed.value.reason
