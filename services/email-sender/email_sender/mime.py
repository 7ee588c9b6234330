"""Building the MIME message for a notification.

The message has a plain-text part and an HTML alternative. Non-ASCII display names
and subjects are written as RFC 2047 encoded words, so they decode back exactly in
any client; bodies are UTF-8 in quoted-printable. The ``Message-ID`` is derived from
the notification id: a message sent twice after a crash carries the same id, which
lets mail clients and servers fold the copies together.

The bytes are exactly those the standard library's generator writes, with the
``compat32`` policy below, for the message built from ``MIMEText`` and
``MIMEMultipart`` (the tests build it that way and compare), but this module
writes them itself. Building those objects
and flattening them took most of a message's time, and most of the rest went to
parsing the recipient's address and to encoding and folding headers that many
messages share: the sender, a recipient, a subject. So each of those is parsed or
folded once, by the same ``compat32`` rules, and kept in a bounded cache, and the
part headers and boundaries, whose layout never changes, are written as they are
around the quoted-printable bodies. The newer ``email.policy`` machinery is not
used at all: it parses every header it is given back into a token tree.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email import charset as charsets
from email import quoprimime
from email.errors import MessageError
from email.header import Header
from email.headerregistry import Address
from email.policy import Compat32
from email.utils import format_datetime, formataddr
from functools import lru_cache
from typing import Any

from contracts.settings import ascii_domain

_UTF8 = charsets.Charset("utf-8")
_UTF8.header_encoding = charsets.SHORTEST
_UTF8.body_encoding = charsets.QP

# Distinct senders, recipients and subjects kept folded; a miss costs what every
# message used to.
_CACHED = 4096


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
_CRLF = b"\r\n"


def _header_block(*headers: tuple[str, str]) -> bytes:
    return b"".join(_WIRE.fold_binary(name, value) for name, value in headers)


def _part_headers(subtype: str) -> bytes:
    """The headers ``MIMEText(..., subtype, "utf-8" in quoted-printable)`` has."""
    return _header_block(
        ("Content-Type", f'text/{subtype}; charset="utf-8"'),
        ("MIME-Version", "1.0"),
        ("Content-Transfer-Encoding", "quoted-printable"),
    )


_TEXT_HEADERS = _part_headers("plain")
_HTML_HEADERS = _part_headers("html")
_MIME_VERSION = _header_block(("MIME-Version", "1.0"))
# Tells mail servers and vacation responders that no human sent this.
_AUTO_SUBMITTED = _header_block(("Auto-Submitted", "auto-generated"))
# RFC 8058: one POST to the List-Unsubscribe URL unsubscribes, with no page between.
_ONE_CLICK = _header_block(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
# RFC 5322's limit for a line, line end excluded.
_MAX_LINE = 998
# The longest line a folded header may have (RFC 5322, 2.1.1).
_FOLDED_LINE = 78


@dataclass(frozen=True)
class Mail:
    """A message ready for SMTP: envelope and the exact bytes of the message."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    message_id: str


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class InvalidAddress(ValueError):
    """An address no mail server will ever accept; retrying cannot help."""


@lru_cache(maxsize=_CACHED)
def recipient(address: str | None, display_name: str) -> Address:
    """``address`` as a header value, or :class:`InvalidAddress` saying why not.

    Cached: parsing an address costs more than writing the rest of a message, and
    the same people are notified again and again. Errors are not cached, so a bad
    address is refused every time.
    """
    if not address or not address.strip():
        raise InvalidAddress("the recipient has no email address")
    # A name is shown, never parsed: a line break in it, which no header can hold,
    # is a space rather than a reason to refuse the email.
    if "\r" in display_name or "\n" in display_name:
        display_name = _LINE_BREAK.sub(" ", display_name)
    if not address.rpartition("@")[0].isascii():
        # Such an address needs SMTPUTF8 all the way to its mailbox, and messages
        # in UTF-8 headers, which these are not; the domain alone can be IDNA.
        raise InvalidAddress(
            f"invalid recipient address {address!r}: the part before the @ is not "
            "ASCII, and only ASCII local parts can be sent to"
        )
    try:
        return Address(display_name=display_name, addr_spec=_ascii_domain(address))
    except (MessageError, ValueError, IndexError) as exc:
        # The standard library reports a bad addr-spec as a header defect, a parse
        # error or, for some inputs, an IndexError; all mean the same here.
        raise InvalidAddress(f"invalid recipient address {address!r}: {exc}") from None


def _ascii_domain(address: str) -> str:
    """``address`` with an internationalised domain written in IDNA 2008
    (punycode), as every mail server takes it; a domain IDNA cannot write raises
    ValueError."""
    local, at, domain = address.strip().rpartition("@")
    if not at:
        return address.strip()
    try:
        return f"{local}@{ascii_domain(domain)}"
    except ValueError as exc:
        raise ValueError(f"the domain {exc}") from None


@lru_cache(maxsize=_CACHED)
def _unsubscribe_headers(url: str) -> bytes:
    """``List-Unsubscribe`` (RFC 2369) naming ``url``, and ``List-Unsubscribe-Post``.

    The URL is written on one line as it is, not folded: folding would put
    whitespace inside the angle brackets, which RFC 2369 asks readers to ignore but
    not every one does. Each recipient's URL is their own, and cached as they are.
    """
    line = f"List-Unsubscribe: <{url}>"
    if not line.isascii() or len(line) > _MAX_LINE or any(c in url for c in "\r\n<>"):
        raise ValueError(
            "an unsubscribe URL must be ASCII, with no line ends or angle brackets, "
            f"and fit on a line of {_MAX_LINE} characters"
        )
    return line.encode("ascii") + _CRLF + _ONE_CLICK


def message_id(notification_id: int, domain: str) -> str:
    return f"<notification-{notification_id}@{domain}>"


@lru_cache(maxsize=_CACHED)
def _address_header(name: str, display_name: str, address: str) -> bytes:
    """The folded ``From`` or ``To`` line.

    A display name in plain ASCII goes as it is, quoted where it needs to be,
    if it folds into lines of at most 78 characters. Any other (not ASCII, too
    long a word to fold, or text that reads as an encoded word) goes as RFC
    2047 encoded words of at most 75 characters each, which fold between them:
    one word for a long name would make a line a strict server refuses.
    """
    if display_name.isascii() and "=?" not in display_name:
        line = _WIRE.fold_binary(name, formataddr((display_name, address)))
        if max(map(len, line.split(_CRLF))) <= _FOLDED_LINE:
            return line
    value = Header(display_name, _UTF8, header_name=name)
    value.append(f"<{address}>", "us-ascii")
    return _WIRE.fold_binary(name, value)


@lru_cache(maxsize=_CACHED)
def _encoded_header(name: str, value: str) -> bytes:
    """The folded line of a free-text header, as RFC 2047 encoded words."""
    return _WIRE.fold_binary(name, Header(value, _UTF8, header_name=name))


@lru_cache(maxsize=1)
def _date_header(second: int) -> bytes:
    """The ``Date`` line, formatted once for all the messages of a second."""
    return _WIRE.fold_binary(
        "Date", format_datetime(datetime.fromtimestamp(second, UTC))
    )


def _quoted_printable(text: str) -> bytes:
    """``text`` as UTF-8 in quoted-printable, as ``MIMEText`` encodes and writes it.

    ``quoprimime`` splits lines at CR, LF or CRLF and wraps them at 76 characters;
    asking it for CRLF line ends is what the generator does to its LF ones.
    """
    latin1 = text.encode("utf-8").decode("latin-1")
    return quoprimime.body_encode(latin1, eol="\r\n").encode("ascii")


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
    unsubscribe_url: str | None = None,
    extra_headers: dict[str, Any] | None = None,
) -> Mail:
    """The message; with ``unsubscribe_url``, its one-click unsubscribe headers."""
    to = recipient(to_address, to_name)
    plain = _quoted_printable(text)
    page = None
    if html:
        page = _quoted_printable(f"<!doctype html><html><body>{html}</body></html>")

    ident = message_id(notification_id, domain)
    headers = [
        _address_header("From", sender_name, sender),
        _address_header("To", to.display_name, to.addr_spec),
        _encoded_header("Subject", subject),
        _date_header(int(time.time())),
        _WIRE.fold_binary("Message-ID", ident),
        _AUTO_SUBMITTED,
        _WIRE.fold_binary("X-Notiflow-Notification-Id", str(notification_id)),
    ]
    if unsubscribe_url is not None:
        headers.append(_unsubscribe_headers(unsubscribe_url))
    headers.extend(
        _encoded_header(name, str(value))
        for name, value in (extra_headers or {}).items()
    )

    if page is not None:
        # "=_" cannot occur in quoted-printable text, so the boundary needs no
        # check against the parts. compat32 folds this header before the boundary
        # parameter, which always has the same length.
        boundary = f"=_notiflow_{secrets.token_hex(12)}".encode("ascii")
        delimiter = b"--" + boundary
        data = b"".join(
            [
                b'Content-Type: multipart/alternative;\r\n boundary="%s"\r\n'
                % boundary,
                _MIME_VERSION,
                *headers,
                _CRLF,
                delimiter,
                _CRLF,
                _TEXT_HEADERS,
                _CRLF,
                plain,
                _CRLF,
                delimiter,
                _CRLF,
                _HTML_HEADERS,
                _CRLF,
                page,
                _CRLF,
                delimiter,
                b"--",
                _CRLF,
            ]
        )
    else:
        data = b"".join([_TEXT_HEADERS, *headers, _CRLF, plain])

    return Mail(
        sender=sender,
        recipients=(to.addr_spec,),
        data=data,
        message_id=ident,
    )
