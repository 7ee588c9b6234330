"""Sending over SMTP, with every failure sorted into "try again" or "give up".

Exceptions::

    SendFailed
    ├── TransientSendError   4xx replies, refused or dropped connections, timeouts,
    │                        a server that accepts TCP and never greets
    └── PermanentSendError   5xx replies, an address the server will never accept,
                             a message the server cannot take (no SMTPUTF8)

Every operation of aiosmtplib has its own timeout; :func:`send` also bounds the whole
conversation, so a server that answers each command slowly cannot hold a worker (and
its row's lease) for ever.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from email.message import EmailMessage

import aiosmtplib


class SendFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransientSendError(SendFailed):
    pass


class PermanentSendError(SendFailed):
    pass


# How many single-command timeouts one whole conversation may take.
DEADLINE_FACTOR = 4


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    timeout: float
    username: str | None = None
    password: str | None = None
    use_tls: bool = False
    start_tls: bool | None = None

    @property
    def deadline(self) -> float:
        """The longest one whole delivery may take: connect, greet, send, quit."""
        return self.timeout * DEADLINE_FACTOR


def _classify(code: int, text: str) -> SendFailed:
    reason = f"SMTP {code}: {text.strip()[:300]}"
    if 500 <= code < 600:
        return PermanentSendError(reason)
    return TransientSendError(reason)


async def send(message: EmailMessage, config: SmtpConfig) -> str:
    """Send ``message`` and return the final reply; raise :class:`SendFailed`."""
    try:
        async with asyncio.timeout(config.deadline):
            errors, reply = await aiosmtplib.send(
                message,
                hostname=config.host,
                port=config.port,
                username=config.username,
                password=config.password,
                use_tls=config.use_tls,
                start_tls=config.start_tls,
                timeout=config.timeout,
            )
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
        raise TransientSendError(
            f"SMTP conversation took longer than {config.deadline:g}s"
        ) from exc
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise TransientSendError(f"SMTP connection failed: {exc!r}") from exc
    if errors:
        worst_code, worst_text = max(errors.values())
        raise _classify(worst_code, worst_text)
    return reply
