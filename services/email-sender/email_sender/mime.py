"""Building the MIME message for a notification.

The message has a plain-text part and an HTML alternative. Non-ASCII display names
and subjects are written as RFC 2047 encoded words, so they decode back exactly in
any client; bodies are UTF-8 in quoted-printable. The ``Message-ID`` is derived from
the notification id: a message sent twice after a crash carries the same id, which
lets mail clients and servers fold the copies together.

The message is assembled with the standard library's ``compat32`` classes and
flattened once, here, into the bytes that go on the wire. The newer
``email.policy`` machinery parses every header it is given back into a token tree;
for a message whose every part this module writes itself, that parsing was most of
the email sender's CPU time.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email import charset as charsets
from email.errors import MessageError
from email.header import Header
from email.headerregistry import Address
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import Compat32
from email.utils import format_datetime, formataddr
from typing import Any

_UTF8 = charsets.Charset("utf-8")
_UTF8.header_encoding = charsets.SHORTEST
_UTF8.body_encoding = charsets.QP


class _Wire(Compat32):
    """compat32 with CRLF line ends, which writes a short ASCII header as it is.

    compat32 turns every header into a :class:`~email.header.Header` to fold it,
    even one that fits on its line unchanged, as most of ours do; that was most of
    the time spent flattening a message. Anything else takes the usual path.
    """

    def _fold(self, name: str, value: Any, sanitize: bool) -> str:
        if (
            isinstance(value, str)
            and value.isascii()
            and "\r" not in value
            and "\n" not in value
            and len(name) + 2 + len(value) <= (self.max_line_length or 78)
        ):
            return f"{name}: {value}{self.linesep}"
        return str(super()._fold(name, value, sanitize))


_WIRE = _Wire(linesep="\r\n")


@dataclass(frozen=True)
class Mail:
    """A message ready for SMTP: envelope and the exact bytes of the message."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    message_id: str


class InvalidAddress(ValueError):
    """An address no mail server will ever accept; retrying cannot help."""


def recipient(address: str | None, display_name: str) -> Address:
    """``address`` as a header value, or :class:`InvalidAddress` saying why not."""
    if not address or not address.strip():
        raise InvalidAddress("the recipient has no email address")
    try:
        return Address(display_name=display_name, addr_spec=address.strip())
    except (MessageError, ValueError, IndexError) as exc:
        # The standard library reports a bad addr-spec as a header defect, a parse
        # error or, for some inputs, an IndexError; all mean the same here.
        raise InvalidAddress(f"invalid recipient address {address!r}: {exc}") from None


def message_id(notification_id: int, domain: str) -> str:
    return f"<notification-{notification_id}@{domain}>"


def _address(display_name: str, address: str) -> str:
    return formataddr((display_name, address), charset=_UTF8)


def build(
    *,
    notification_id: int,
    to_address: str,
    to_name: str,
    subject: str,
    text: str,
    html: str | None,
    sender: str,
    sender_name: str,
    domain: str,
    extra_headers: dict[str, Any] | None = None,
) -> Mail:
    to = recipient(to_address, to_name)
    body = MIMEText(text, "plain", _UTF8)
    if html:
        msg: MIMEText | MIMEMultipart = MIMEMultipart("alternative")
        # A boundary of our own: left to the generator, each message would compile
        # a fresh regular expression to check that its random boundary does not
        # occur in the parts. "=_" cannot occur in quoted-printable text at all.
        msg.set_boundary(f"=_notiflow_{secrets.token_hex(12)}")
        msg.attach(body)
        page = f"<!doctype html><html><body>{html}</body></html>"
        msg.attach(MIMEText(page, "html", _UTF8))
    else:
        msg = body

    ident = message_id(notification_id, domain)
    msg["From"] = _address(sender_name, sender)
    msg["To"] = _address(to.display_name, to.addr_spec)
    msg["Subject"] = Header(subject, _UTF8, header_name="Subject")
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = ident
    # Tells mail servers and vacation responders that no human sent this.
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Notiflow-Notification-Id"] = str(notification_id)
    for name, value in (extra_headers or {}).items():
        msg[name] = Header(str(value), _UTF8, header_name=name)

    return Mail(
        sender=sender,
        recipients=(to.addr_spec,),
        data=msg.as_bytes(policy=_WIRE),
        message_id=ident,
    )
