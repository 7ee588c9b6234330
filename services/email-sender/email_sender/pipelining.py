"""One mail transaction in two round trips for servers that offer PIPELINING, and
one command at a time for the others, with its own wait for the content's reply.

Without PIPELINING a transaction is MAIL, wait, RCPT (once per recipient), wait,
DATA, wait, content, wait. RFC 2920 lets the client send MAIL, every RCPT and DATA
in one write and read their replies afterwards, in order; only the content must
wait for the 354 that DATA gets. Each round trip saved is a write and a wake-up on
both ends.

The reply to the end of the content is waited for longer than the others
(``data_timeout``): RFC 5321 (section 4.5.3.2) gives it ten minutes, for a server
may scan or store the message before it answers, and a client that stops waiting
then cannot know whether the message was taken; sending it again may deliver it
twice. aiosmtplib's ``sendmail`` waits as long for every reply, so both ways of
sending go through :func:`sendmail` here.

aiosmtplib sends every command on its own, and its reader cannot collect several
replies: it parses one reply per arrival of data, leaves any further reply in its
buffer until more bytes come, and drops data that arrives while a parsed reply
waits to be picked up (its guard against unsolicited replies). A server that sends
the replies to MAIL and RCPT in one segment, as Postfix does on purpose, would
leave the second unread until the command timeout. So for the length of one
transaction the connection's protocol is swapped, through asyncio's
``transport.set_protocol``, for :class:`_Replies`, which queues every complete
reply, and put back afterwards. aiosmtplib still connects, negotiates TLS, logs
in, greets and quits; the command lines, the line ends and the dot-stuffing of the
content are built with its own helpers.

Some servers advertise PIPELINING and still take a batch for commands out of
order, answering RCPT or DATA with 503 (bad sequence of commands) although MAIL
was accepted; :class:`BatchRefused` tells the caller so, and it may send the same
message one command at a time.

Replies are checked as ``SMTP.sendmail`` checks them and failures are raised as the
same aiosmtplib exceptions, so the caller sorts them in one place. A transaction
that fails leaves replies in flight, or a server waiting for content, so the
connection is closed with it; closing in the middle of DATA makes any server drop
the transaction, which is what RFC 2920 asks of a client whose recipients were all
refused.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import cast

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_LINE_LENGTH,
    MAX_RESPONSE_LENGTH,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import SMTPStatus

_ACCEPTED = (SMTPStatus.completed, SMTPStatus.will_forward)
# Distinct addresses kept quoted; a miss costs what every command used to.
_CACHED = 4096


async def sendmail(
    client: aiosmtplib.SMTP,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    mail_options: Sequence[str] = (),
    *,
    data_timeout: float | None,
    pipelined: bool = True,
    content_goes: Callable[[], None] | None = None,
) -> tuple[dict[str, SMTPResponse], str]:
    """What ``client.sendmail`` does; the client must have said EHLO or HELO.

    ``content_goes`` is called just before the content is written: from then on
    the server may take the message.

    MAIL, every RCPT and DATA go in one write if ``pipelined``, each after the
    previous reply otherwise. Every reply is waited for ``client.timeout`` seconds
    but the one to the end of the content, ``data_timeout``.

    Returns the refused recipients and the reply to the content, and raises what
    ``sendmail`` raises: :class:`ValueError` for an address that cannot go on a
    command line (before anything is sent), ``SMTPNotSupported``,
    ``SMTPSenderRefused``, ``SMTPRecipientsRefused``, ``SMTPDataError``,
    :class:`BatchRefused` (pipelined, a 503 to RCPT or DATA), and
    ``SMTPServerDisconnected`` (:class:`LostAfterContent` once the whole content
    was sent) or ``SMTPReadTimeoutError``.
    """
    options = list(mail_options)
    utf8 = any(option.lower() == "smtputf8" for option in options)
    if utf8 and not client.supports_extension("smtputf8"):
        raise aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported by this server")
    content = normalize_message_line_endings(message)
    if client.supports_extension("size"):
        # RFC 1870: the octets as sent, CRLFs included, before dot-stuffing.
        options.insert(0, f"size={len(content)}")

    commands = _envelope(sender, recipients, options, "utf-8" if utf8 else "ascii")
    protocol = client.protocol
    if protocol is None or not protocol.is_connected:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    transport = cast(asyncio.Transport, protocol.transport)

    replies = _Replies(protocol)
    transport.set_protocol(replies)
    try:
        return await _transaction(
            transport,
            _Exchange(transport, replies, commands, client.timeout, pipelined),
            sender,
            recipients,
            content,
            data_timeout,
            content_goes,
        )
    except BaseException:
        client.close()
        raise
    finally:
        transport.set_protocol(protocol)


async def _transaction(
    transport: asyncio.Transport,
    exchange: _Exchange,
    sender: str,
    recipients: Sequence[str],
    content: bytes,
    data_timeout: float | None,
    content_goes: Callable[[], None] | None,
) -> tuple[dict[str, SMTPResponse], str]:
    mail = await exchange.reply()
    if mail.code != SMTPStatus.completed:
        raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender)

    refused: list[aiosmtplib.SMTPRecipientRefused] = []
    for address in recipients:
        reply = await exchange.reply()
        exchange.check_order(reply)
        if reply.code not in _ACCEPTED:
            refused.append(
                aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, address)
            )
    if len(refused) == len(recipients):
        # Pipelined, DATA's reply is still to come: a 5xx, or a 354 from a server
        # that breaks RFC 2920's rule. Either way no content follows, and closing
        # the connection (below) ends the transaction on the server.
        raise aiosmtplib.SMTPRecipientsRefused(refused)

    start = await exchange.reply()
    exchange.check_order(start)
    if start.code != SMTPStatus.start_input:
        message = start.message
        if start.code < 400:
            # A success where 354 was due: a reply came that no command asked
            # for, and every reply since answers the command before its own.
            message = (
                f"{message} (in answer to DATA, where 354 was due: the server's "
                "replies are out of step with the commands; the connection is "
                "dropped and the email retried)"
            )
        raise aiosmtplib.SMTPDataError(start.code, message)
    if content_goes is not None:
        content_goes()
    transport.write(PERIOD_REGEX.sub(b"..", content) + b".\r\n")
    # The server may have taken the message before this reply comes.
    try:
        done = await exchange.replies.next(data_timeout)
    except aiosmtplib.SMTPReadTimeoutError as exc:
        waited = "" if data_timeout is None else f" within {data_timeout:g}s"
        raise aiosmtplib.SMTPReadTimeoutError(
            f"no reply to the end of the content{waited}; the server may have "
            "taken the email"
        ) from exc
    except aiosmtplib.SMTPServerDisconnected as exc:
        raise LostAfterContent(
            "connection lost after the content was sent, before the server's "
            f"reply ({exc}); the server may have taken the email"
        ) from exc
    if done.code != SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(done.code, done.message)

    errors = {r.recipient: SMTPResponse(r.code, r.message) for r in refused}
    return errors, done.message


class LostAfterContent(aiosmtplib.SMTPServerDisconnected):
    """The connection closed once the whole content had gone, before its reply:
    unlike a connection lost earlier, the server may have taken the message."""


class BatchRefused(aiosmtplib.SMTPResponseException):
    """A server that offers PIPELINING answered "bad sequence of commands" (503)
    to a RCPT or DATA that came after its accepted MAIL in one write.

    Such a server does not read a batch as the commands in turn it is, whatever
    it advertises. It has taken nothing, since DATA was refused or never reached,
    and the same transaction may go through one command at a time.
    """


class _Exchange:
    """The envelope's commands and their replies, sent all at once or in turn."""

    def __init__(
        self,
        transport: asyncio.Transport,
        replies: _Replies,
        commands: list[bytes],
        timeout: float | None,
        pipelined: bool,
    ) -> None:
        self.replies = replies
        self._transport = transport
        self._commands = deque(commands)
        self._timeout = timeout
        self._pipelined = pipelined

    def check_order(self, reply: SMTPResponse) -> None:
        """Raise :class:`BatchRefused` if ``reply``, to a command after an
        accepted MAIL, says the batch was read out of order."""
        if self._pipelined and reply.code == SMTPStatus.bad_command_sequence:
            raise BatchRefused(reply.code, reply.message)

    async def reply(self) -> SMTPResponse:
        """The reply to the next command, sent first unless it has already gone."""
        if not self._pipelined:
            self._transport.write(self._commands.popleft())
        elif self._commands:
            self._transport.write(b"".join(self._commands))
            self._commands.clear()
        return await self.replies.next(self._timeout)


def _envelope(
    sender: str, recipients: Sequence[str], options: list[str], encoding: str
) -> list[bytes]:
    """MAIL, one RCPT per recipient and DATA, as the command lines aiosmtplib writes.

    Every address is checked before anything is sent, as ``sendmail`` does, so a
    bad recipient never leaves a half-written envelope on the server.
    """
    mail = [b"MAIL", b"FROM:" + _quoted(sender).encode(encoding)]
    mail += [option.encode("ascii") for option in options]
    lines = [mail]
    lines += [[b"RCPT", b"TO:" + _quoted(r).encode(encoding)] for r in recipients]
    for line in lines:
        for arg in line:
            if COMMAND_INJECTION_REGEX.search(arg):
                raise ValueError("Command arg contains a prohibited control character")
    return [b" ".join(line) + b"\r\n" for line in lines] + [b"DATA\r\n"]


@lru_cache(maxsize=_CACHED)
def _quoted(address: str) -> str:
    """aiosmtplib's ``quote_address``, cached.

    It parses the address with the standard library each time, which cost more
    than the rest of building the commands; the sender is the same on every
    message and recipients come back. A refused address raises every time.
    """
    return quote_address(address)


class _Replies(asyncio.Protocol):
    """The replies of one pipelined transaction, queued in the order they come.

    It stands in for aiosmtplib's protocol on the transport and passes on what
    that protocol must still learn: a lost connection (so the client knows it is
    closed) and the transport's flow control.
    """

    def __init__(self, smtp: SMTPProtocol) -> None:
        self._smtp = smtp
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._size = 0
        self._replies: deque[SMTPResponse] = deque()
        self._failure: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def next(self, timeout: float | None) -> SMTPResponse:
        """The next reply, or why none will come."""
        while not self._replies:
            if self._failure is not None:
                raise self._failure
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError as exc:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from exc
            finally:
                self._waiter = None
        return self._replies.popleft()

    def data_received(self, data: bytes) -> None:
        if self._failure is not None:
            return
        self._buffer += data
        try:
            self._parse()
        except aiosmtplib.SMTPResponseException as exc:
            self._failure = exc
        self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # the transport closes, and connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self._smtp.connection_lost(exc)

    def pause_writing(self) -> None:
        self._smtp.pause_writing()

    def resume_writing(self) -> None:
        self._smtp.resume_writing()

    def _parse(self) -> None:
        """Move every complete reply from the buffer to the queue."""
        buffer = self._buffer
        start = 0
        while (end := buffer.find(b"\n", start)) != -1:
            line = bytes(buffer[start : end + 1])
            start = end + 1
            if len(line) > MAX_LINE_LENGTH:
                raise _invalid("Response too long")
            try:
                code = int(line[:3])
            except ValueError:
                text = line.decode("utf-8", errors="ignore")
                raise _invalid(f"Malformed SMTP response line: {text}") from None
            self._lines.append(line[4:].strip(b" \t\r\n"))
            self._size += len(line)
            if self._size > MAX_RESPONSE_LENGTH:
                raise _invalid("Response too long")
            if line[3:4] != b"-":
                text = b"\n".join(self._lines).decode("utf-8", "surrogateescape")
                self._replies.append(SMTPResponse(code, text))
                self._lines = []
                self._size = 0
        del buffer[:start]
        if len(buffer) > MAX_LINE_LENGTH:
            raise _invalid("Response too long")

    def _fail(self, failure: Exception) -> None:
        if self._failure is None:
            self._failure = failure
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _invalid(reason: str) -> aiosmtplib.SMTPResponseException:
    return aiosmtplib.SMTPResponseException(SMTPStatus.invalid_response.value, reason)
