"""Sending over SMTP, with every failure sorted into "try again" or "give up".

Exceptions::

    SendFailed
    ├── TransientSendError   4xx replies, refused or dropped connections, timeouts,
    │                        a server that accepts TCP and never greets, and any
    │                        refusal before the first mail (the greeting, EHLO,
    │                        STARTTLS or the login, 5xx included), and 503 (bad
    │                        sequence of commands) and 530 (authentication
    │                        required) at any point
    └── PermanentSendError   other 5xx replies to a message, an address the server
                             will never accept, a message the server cannot take
                             (no SMTPUTF8)

A refusal of the session says nothing of the message: a wrong password or a relay
out of service refuses every email alike until the operator or the server's owner
puts it right, so such emails are retried after their delays rather than failed at
the first attempt.

Every operation has its own timeout, and the reply to the end of the content a
longer one of its own (see :mod:`email_sender.pipelining`); :class:`SmtpPool` also
bounds the whole conversation, so a server that answers each command slowly cannot
hold a worker (and its row's lease) for ever.

:class:`SmtpPool` keeps connections open between messages: connecting, greeting and
negotiating TLS cost more than sending a short notification. A connection is used by
one message at a time and dropped after any error, so a failure never leaks into
the next message. A kept connection may have been closed by the server meanwhile;
a message whose reused connection turns out dead before its content was all sent
is sent again at once on a new one, since the server cannot have accepted it. A
connection lost after the content went, before the server's reply, is a failure
like a timeout there: the server may have taken the message, and it is retried
later, not at once.

A server that offers PIPELINING (RFC 2920; Postfix, Exim and most real servers do)
gets MAIL, every RCPT and DATA in one write (see :mod:`email_sender.pipelining`),
any other server one command at a time, and so does a server that offered it and
then refused a batch as commands out of order (503 to RCPT or DATA): the message
is sent again at once, one command at a time, and so is every later one. Both take
the same MAIL parameters, chosen by :func:`_mail_options`, and fail with the same
exceptions, sorted below.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiosmtplib

from email_sender import pipelining
from email_sender.mime import Mail

logger = logging.getLogger(__name__)


class SendFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransientSendError(SendFailed):
    pass


class PermanentSendError(SendFailed):
    pass


class _Crowded(TransientSendError):
    """A new connection refused for now while others were open."""


class NoConnection(TransientSendError):
    """Nothing was sent: the server allows only so many connections at once, and
    none came free in time. The email was not tried; it waits its turn."""


# Seconds before a server that refused a connection, while none of this sender's
# was open but it had refused one too many before, is asked again.
CROWDED_PAUSE = 1.0


class TooLate(Exception):
    """Not sent: the row's lease would run out first. Nothing failed; the row
    is left to the lease sweeper, which hands it out again."""


# How many single-command timeouts one whole conversation may take, on top of
# the wait for the reply to the end of the content.
DEADLINE_FACTOR = 4


def deadline(timeout: float, data_timeout: float) -> float:
    """The longest one whole delivery may take: connect, greet, send, quit."""
    return timeout * DEADLINE_FACTOR + data_timeout


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    timeout: float
    username: str | None = None
    password: str | None = None
    use_tls: bool = False
    start_tls: bool | None = None
    # The wait for the reply to the end of the content, which may come after the
    # server has taken the message; None: ``timeout``.
    data_timeout: float | None = None
    # The name given in EHLO; None: this host's fully qualified name.
    helo_name: str | None = None

    def client_options(self) -> dict[str, Any]:
        """The connection options of aiosmtplib's ``SMTP`` and ``send``."""
        return {
            "local_hostname": self.helo_name,
            "hostname": self.host,
            "port": self.port,
            "username": self.username,
            "password": self.password,
            "use_tls": self.use_tls,
            "start_tls": self.start_tls,
            "timeout": self.timeout,
        }

    @property
    def content_timeout(self) -> float:
        return self.timeout if self.data_timeout is None else self.data_timeout

    @property
    def deadline(self) -> float:
        """The longest one whole delivery may take: connect, greet, send, quit."""
        return deadline(self.timeout, self.content_timeout)


# 5xx replies that say the session went wrong, not the message: "bad sequence of
# commands", and "authentication required" (or STARTTLS first), which a relay
# answers MAIL with when the sender's settings do not log in.
_SESSION_REFUSALS = frozenset({503, 530})


def _classify(code: int, text: str) -> SendFailed:
    reason = f"SMTP {code}: {text.strip()[:300]}"
    if 500 <= code < 600 and code not in _SESSION_REFUSALS:
        return PermanentSendError(reason)
    return TransientSendError(reason)


def _raise_for(errors: dict[str, aiosmtplib.SMTPResponse]) -> None:
    if errors:
        worst_code, worst_text = max(errors.values())
        raise _classify(worst_code, worst_text)


async def _classified(call: Awaitable[str]) -> str:
    """Await ``call``, turning every SMTP failure into a :class:`SendFailed`."""
    try:
        return await call
    except SendFailed:
        raise
    except aiosmtplib.SMTPRecipientsRefused as exc:
        worst = max(exc.recipients, key=lambda r: r.code)
        raise _classify(worst.code, worst.message) from exc
    except aiosmtplib.SMTPResponseException as exc:
        raise _classify(exc.code, exc.message) from exc
    except aiosmtplib.SMTPNotSupported as exc:
        raise PermanentSendError(f"SMTP server cannot take it: {exc}") from exc
    except aiosmtplib.SMTPTimeoutError as exc:
        raise TransientSendError(f"SMTP timeout: {exc}") from exc
    except TimeoutError as exc:
        raise TransientSendError(f"SMTP timeout: {exc!r}") from exc
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise TransientSendError(f"SMTP connection failed: {exc!r}") from exc


# "Service not available, closing transmission channel".
_CLOSING = 421


class SmtpPool:
    """Up to ``size`` open SMTP connections, each used by one message at a time."""

    def __init__(
        self, config: SmtpConfig, size: int, idle_seconds: float = 30.0
    ) -> None:
        self._config = config
        self._idle_seconds = idle_seconds
        self._slots = asyncio.Semaphore(size)
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        # Why the last connection could not be opened, until one opens again.
        self._unreachable: str | None = None
        # Off once the server has refused a batch it said it would take.
        self._pipelining = True
        # Connections in use, and being opened; the most the server has been
        # seen to allow at once (None until it refuses one more); set as one is
        # freed.
        self._in_use = 0
        self._opening = 0
        self._cap: int | None = None
        self._freed = asyncio.Event()

    async def send(self, mail: Mail, ends_by: float | None = None) -> str:
        """Send ``mail``; raise :class:`SendFailed`.

        With ``ends_by`` (a time on ``time.monotonic``'s clock, the end of the
        lease on the mail's row), raise :class:`TooLate` instead of starting a
        conversation that might not be over by then: past it, the row may be
        another sender's, and the email on its way from there.
        """
        async with self._slots:
            now = time.monotonic()
            if ends_by is not None and now + self._config.deadline > ends_by:
                raise TooLate(
                    "the row's lease would run out before a whole SMTP conversation "
                    "could end (the process was paused or starved, say)"
                )
            return await self._send_by(mail, ends_by or now + self._config.deadline)

    async def _send_by(self, mail: Mail, until: float) -> str:
        """Send ``mail``, the conversation over by ``until`` (``time.monotonic``).

        The content goes only while the whole wait for its reply still fits
        before ``until``: a conversation cut short after the content went may
        have delivered the email, and it would be sent again. The commands before
        it (connecting, greeting, TLS, login, the envelope) take what time is left
        until then, each within its own timeout; past it, nothing was sent.
        """
        loop = asyncio.get_running_loop()
        on_loop = loop.time() - time.monotonic()
        reply_wait = self._config.content_timeout
        content_by = until - reply_wait
        budget = content_by - time.monotonic()
        went = False
        connected: list[bool] = []

        def content_goes() -> None:
            nonlocal went
            went = True
            # The reply's own wait, of reply_wait, ends first.
            limit.reschedule(until + on_loop)

        try:
            async with asyncio.timeout_at(content_by + on_loop) as limit:
                return await _classified(self._send(mail, content_goes, connected))
        except TimeoutError as exc:
            if went:
                raise TransientSendError(
                    f"no reply to the end of the content within {reply_wait:g}s; "
                    "the server may have taken the email"
                ) from exc
            if not connected and self._cap is not None:
                raise NoConnection(
                    f"none of the {self._cap} connections the SMTP server allows "
                    f"at once came free within {budget:.3g}s; nothing was sent"
                ) from exc
            raise TransientSendError(
                f"the SMTP server took longer than {budget:.3g}s over the "
                "commands before the content, which was not sent (a server this "
                "slow needs a longer NOTIFLOW_EMAIL_LEASE_SECONDS)"
            ) from exc

    async def _send(
        self, mail: Mail, content_goes: Callable[[], None], connected: list[bool]
    ) -> str:
        """Send ``mail`` on a connection of the pool, saying in ``connected``
        once it has one."""
        client, reused = await self._checkout()
        connected.append(True)
        try:
            return await self._send_on(client, reused, mail, content_goes)
        finally:
            self._in_use -= 1
            self._freed.set()

    async def _send_on(
        self,
        client: aiosmtplib.SMTP,
        reused: bool,
        mail: Mail,
        content_goes: Callable[[], None],
    ) -> str:
        try:
            errors, reply = await self._transmit(client, mail, content_goes)
        except pipelining.BatchRefused as exc:
            _discard(client)
            self._stop_pipelining(exc)
            # Refused before DATA was accepted, so nothing was taken: the same
            # message goes again now, one command at a time.
            client, errors, reply = await self._again(mail, content_goes)
        except aiosmtplib.SMTPSenderRefused as exc:
            _discard(client)
            if not (reused and exc.code == _CLOSING):
                raise
            # A server closes a kept connection so once it has carried as many
            # messages as it allows; it took nothing of this one, which goes
            # now on a new connection.
            client, errors, reply = await self._again(mail, content_goes)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            _discard(client)
            if not reused or isinstance(exc, pipelining.LostAfterContent):
                raise
            # The server closed a kept connection while it sat idle, or during
            # the envelope; it cannot have taken this message, so a fresh
            # connection sends it now.
            client, errors, reply = await self._again(mail, content_goes)
        except BaseException:
            _discard(client)
            raise
        if errors:
            _discard(client)
            _raise_for(errors)
        self._idle.append((client, time.monotonic()))
        return reply

    async def _again(
        self, mail: Mail, content_goes: Callable[[], None]
    ) -> tuple[aiosmtplib.SMTP, dict[str, aiosmtplib.SMTPResponse], str]:
        """``mail`` sent once more, on a new connection."""
        client = await self._connect()
        try:
            errors, reply = await self._transmit(client, mail, content_goes)
        except BaseException:
            _discard(client)
            raise
        return client, errors, reply

    async def _transmit(
        self, client: aiosmtplib.SMTP, mail: Mail, content_goes: Callable[[], None]
    ) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        return await pipelining.sendmail(
            client,
            mail.sender,
            mail.recipients,
            mail.data,
            _mail_options(client, mail),
            data_timeout=self._config.content_timeout,
            pipelined=self._pipelining and client.supports_extension("pipelining"),
            content_goes=content_goes,
        )

    def _stop_pipelining(self, refusal: pipelining.BatchRefused) -> None:
        """Send one command at a time from now on, saying so once."""
        if self._pipelining:
            self._pipelining = False
            logger.warning(
                "the SMTP server at %s:%d offers PIPELINING but refused a batch "
                "of commands (%d %s); this sender sends one command at a time to "
                "it until restarted",
                self._config.host,
                self._config.port,
                refusal.code,
                refusal.message.strip()[:300],
                extra={"action": "smtp.pipelining_refused"},
            )

    async def _checkout(self) -> tuple[aiosmtplib.SMTP, bool]:
        """A kept connection, or a new one if the server allows one more; counted
        in use from here until :meth:`_send` is done with it."""
        paused = False
        while True:
            now = time.monotonic()
            while self._idle:
                client, since = self._idle.pop()
                if now - since < self._idle_seconds and client.is_connected:
                    self._in_use += 1
                    return client, True
                _discard(client)
            if self._cap is None or self._in_use + self._opening < self._cap:
                refused: _Crowded | None = None
                self._opening += 1
                try:
                    client = await self._connect()
                except _Crowded as exc:
                    refused = exc
                else:
                    self._in_use += 1
                    return client, False
                finally:
                    self._opening -= 1
                    self._freed.set()
                # How many the server took is known once the connections
                # opened beside this one have been taken or refused too.
                while self._opening > 0:
                    self._freed.clear()
                    await self._freed.wait()
                if self._in_use > 0:
                    self._keep_to(self._in_use, refused)
                elif self._cap is not None and not paused:
                    # None of ours is open, but the server may not have seen
                    # the last ones close yet: asked again shortly, once.
                    paused = True
                    await asyncio.sleep(CROWDED_PAUSE)
                else:
                    # It took none: refused for another reason than their number.
                    self._lost(refused.reason)
                    raise TransientSendError(refused.reason) from refused
                continue
            # One of the connections in use is wanted, once it is done.
            self._freed.clear()
            await self._freed.wait()

    def _keep_to(self, most: int, refusal: _Crowded) -> None:
        """Open no more than ``most`` connections at once from now on, the server
        having refused one more; say so when that lowers the limit."""
        if self._cap is None or most < self._cap:
            self._cap = most
            logger.warning(
                "the SMTP server at %s:%d refused a connection while %d of this "
                "sender's were open (%s); it opens no more than that at once "
                "until restarted, and emails wait for one of them",
                self._config.host,
                self._config.port,
                most,
                refusal.reason,
                extra={"action": "smtp.connections_limited"},
            )

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(**self._config.client_options())
        try:
            await client.connect()
            await _greet(client)
        except aiosmtplib.SMTPResponseException as exc:
            _discard(client)
            refused = (
                f"SMTP server refused the session before any mail "
                f"(greeting, EHLO, STARTTLS or login): {exc.code} "
                f"{exc.message.strip()[:300]}"
            )
            if 400 <= exc.code < 500 and (
                self._in_use + self._opening > 1 or self._cap is not None
            ):
                # Refused for now while others of ours are open or opening:
                # perhaps one connection too many for this server (Postfix
                # allows 50 from one client by default).
                raise _Crowded(refused) from exc
            self._lost(refused)
            raise TransientSendError(refused) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            _discard(client)
            self._lost(repr(exc))
            raise
        except BaseException:
            _discard(client)
            raise
        if self._unreachable is not None:
            self._unreachable = None
            logger.info(
                "the SMTP server at %s:%d takes connections again",
                self._config.host,
                self._config.port,
                extra={"action": "smtp.reachable"},
            )
        return client

    def _lost(self, reason: str) -> None:
        """Say once, as a warning, that the server cannot be reached: every
        email's retry says so too, but only at info level, one by one."""
        if self._unreachable is None:
            logger.warning(
                "cannot open a session with the SMTP server at %s:%d: %s; emails "
                "are retried after their delays until it answers",
                self._config.host,
                self._config.port,
                reason,
                extra={"action": "smtp.unreachable"},
            )
        self._unreachable = reason

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client, _ in idle:
            try:
                async with asyncio.timeout(2):
                    await client.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                _discard(client)


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO if EHLO is refused, as ``sendmail`` would before its first mail.

    Said once per connection, when it opens, so that the server's extensions are
    known before a message chooses how to go. ``connect`` has already said it
    unless TLS from the start or a refused STARTTLS made it unnecessary.
    """
    if not client.is_ehlo_or_helo_needed:
        return
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not client.is_connected:
            raise
        await client.helo()


def _mail_options(client: aiosmtplib.SMTP, mail: Mail) -> list[str]:
    """The MAIL parameters of ``mail``, by the rules of aiosmtplib's ``send_message``.

    SMTPUTF8 when an envelope address is not ASCII, and a server without it cannot
    take the message at all. BODY=8BITMIME when the content has 8-bit bytes and the
    server knows the keyword; ``send_message`` declares it whenever the server does,
    but its content may be 8-bit without saying so, while the bytes here are
    checked. What :mod:`email_sender.mime` builds is ASCII throughout and takes no
    parameter; a server without 8BITMIME is sent 8-bit bytes as they are, as
    ``sendmail`` sends them.
    """
    options: list[str] = []
    if not (mail.sender.isascii() and all(r.isascii() for r in mail.recipients)):
        if not client.supports_extension("smtputf8"):
            raise aiosmtplib.SMTPNotSupported(
                "an envelope address is not ASCII, and the server lacks SMTPUTF8"
            )
        options.append("SMTPUTF8")
    if not mail.data.isascii() and client.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    return options


def _discard(client: aiosmtplib.SMTP) -> None:
    """Drop a connection without talking to the server: it may be the problem."""
    client.close()
