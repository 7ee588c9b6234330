"""Building the MIME message for a notification.

The message has a plain-text part and an HTML alternative. Non-ASCII display names
and subjects are written as RFC 2047 encoded words by the standard library's
``email.policy.SMTP``, so they decode back exactly in any client. The ``Message-ID``
is derived from the notification id: a message sent twice after a crash carries the
same id, which lets mail clients and servers fold the copies together.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.errors import MessageError
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from typing import Any


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
) -> EmailMessage:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = Address(display_name=sender_name, addr_spec=sender)
    msg["To"] = recipient(to_address, to_name)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = message_id(notification_id, domain)
    # Tells mail servers and vacation responders that no human sent this.
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Notiflow-Notification-Id"] = str(notification_id)
    for name, value in (extra_headers or {}).items():
        msg[name] = str(value)

    msg.set_content(text, cte="quoted-printable")
    if html:
        msg.add_alternative(
            f"<!doctype html><html><body>{html}</body></html>", subtype="html"
        )
    return msg
