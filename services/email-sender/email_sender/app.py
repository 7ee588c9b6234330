"""Wires the email sender: consumer of email deliveries, lease sweeper, health routes.

The sweeper re-enqueues deliveries whose worker died through the outbox, so this
service also runs an outbox relay.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import socket
import unicodedata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI
from pydantic import AfterValidator, Field, model_validator
from pydantic_settings import SettingsConfigDict

from contracts import topology, tracing
from contracts.db import GENERIC_PLANS
from contracts.http import install_http_policy
from contracts.messages import DeliveryBatch, DeliveryRequested
from contracts.recovery import LeaseSweeper
from contracts.runtime import Runtime, health_router
from contracts.settings import (
    MAX_PREFETCH,
    Settings,
    TcpPort,
    WebUrl,
    ascii_domain,
    is_host,
    prefetch_holds_batch,
)
from email_sender import smtp
from email_sender.worker import EmailWorker

logger = logging.getLogger(__name__)

# Batches handled at once. With several running, a delivery that arrives meanwhile
# starts at once in a batch of its own, and deliveries wait and gather into larger
# batches only once every worker is busy, which is when saving statements matters.
BATCH_WORKERS = 8
# A batch lasts as long as its slowest SMTP conversation, and one server slow to
# take some recipients' emails would keep every worker, and every other
# recipient's email, waiting. A batch running longer than this (far longer than a
# conversation with a server that answers at once) stops counting as a worker;
# its sent emails are settled as they go, and the deliveries in hand stay bounded
# by BATCH_WORKERS batches' worth.
SLOW_BATCH_SECONDS = 1.0


# RFC 5322's atext, of which an unquoted local part is made, between single dots.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_PART = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_ADDRESS = "a bare address such as notifications@example.com"
_DOMAIN = (
    "a domain name: labels of letters, digits and hyphens between dots (in any "
    "script), the last not all digits"
)


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else f"{value[:80]}...")


def _ascii_domain(domain: str, complaint: str) -> str:
    """``domain`` in ASCII, an internationalised one in IDNA 2008 (``xn--…``).

    If it is no domain name, ValueError with ``complaint``, and why IDNA cannot
    write it if that is the reason. An IP address is none: a ``Message-ID`` wants
    a name, and an address after a sender's @ is written as a literal
    (``[192.0.2.1]``), not taken here.
    """
    try:
        written = ascii_domain(domain)
    except ValueError as exc:
        raise ValueError(f"{complaint}; it {exc}") from None
    try:
        ipaddress.ip_address(written)
    except ValueError:
        if is_host(written):
            return written
    raise ValueError(complaint)


def _mail_from(value: str) -> str:
    """The sender's address as SMTP and the ``From`` header take it: a dot-atom
    local part and a domain name, in IDNA if internationalised.

    The part before the @ is held to ASCII: the ``From`` header cannot be written
    with anything else, so every email would fail to build.
    """
    shown = _shown(value)
    if "<" in value or any(c.isspace() for c in value):
        raise ValueError(
            f"must be {_ADDRESS}, with no display name or spaces (the name goes "
            f"in NOTIFLOW_MAIL_FROM_NAME), got {shown}"
        )
    local, at, domain = value.rpartition("@")
    if not at:
        raise ValueError(f"must be {_ADDRESS}, got {shown}")
    if len(local) > 64 or not _LOCAL_PART.fullmatch(local):
        raise ValueError(
            f"must be {_ADDRESS}: before the @, at most 64 ASCII letters, digits "
            f"and !#$%&'*+/=?^_`{{|}}~- with single dots between them, got {shown}"
        )
    domain = _ascii_domain(
        domain, f"must be {_ADDRESS}: after the @, {_DOMAIN}; got {shown}"
    )
    address = f"{local}@{domain}"
    if len(address) > 254:
        raise ValueError(f"must be at most 254 characters long, got {shown}")
    return address


def _mail_from_name(value: str) -> str:
    """The display name of the ``From`` header, free of control characters.

    A line end would start a header of its own (or fail every email as the header
    is built), and other controls would be written into it as they are. The one
    line end a YAML block scalar leaves at the end is taken off.
    """
    name = value.removesuffix("\n")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise ValueError(
            "must be one line of text, with no line ends, NUL or other control "
            f"characters, got {_shown(value)}"
        )
    return name


def _mail_domain(value: str) -> str:
    """The right-hand side of ``Message-ID``s, which are written as they are."""
    return _ascii_domain(
        value, f"must be {_DOMAIN}, such as example.com; got {_shown(value)}"
    )


def _smtp_host(value: str) -> str:
    """The mail server: an IP address or a host name (in IDNA if internationalised).
    Checked by its syntax alone; whether it resolves shows on the first email."""
    host = value.strip()
    try:
        written = ascii_domain(host) if host else ""
    except ValueError:
        written = ""
    if not is_host(written):
        raise ValueError(
            "must be a host name or an IP address, such as smtp.example.com or "
            f"127.0.0.1, got {_shown(value)}"
        )
    return written


def _helo_name(value: str | None) -> str | None:
    """The name the sender gives itself in EHLO: a fully qualified host name (in
    IDNA if internationalised), or an IP address, written as RFC 5321's address
    literal. Empty or unset: the host's own name, as the client finds it."""
    if value is None or not value.strip():
        return None
    name = value.strip()
    # As given, or already written as SMTP's address literal.
    literal = name.removeprefix("[").removesuffix("]").removeprefix("IPv6:")
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:
        address = None
    if address is not None and "%" not in literal and not address.is_unspecified:
        return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"
    if address is not None or literal != name:
        raise ValueError(
            "must be an address of this host, with no zone: such as 192.0.2.7 or "
            f"2001:db8::7, got {_shown(value)}"
        )
    try:
        written = ascii_domain(name)
    except ValueError:
        written = ""
    if not is_host(written) or "." not in written.strip("."):
        raise ValueError(
            "must be this host's fully qualified name, such as mail.example.com, "
            f"or its IP address, got {_shown(value)}"
        )
    return written


class EmailSettings(Settings):
    model_config = SettingsConfigDict(env_prefix="NOTIFLOW_", extra="ignore")

    smtp_host: Annotated[str, AfterValidator(_smtp_host)] = "127.0.0.1"
    smtp_port: TcpPort = 1025
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_use_tls: bool = False
    smtp_starttls: bool | None = None
    smtp_timeout: float = Field(default=10.0, gt=0)
    # What the sender calls itself in EHLO. Relays that want a fully qualified
    # name refuse the host name a container is given.
    smtp_helo_name: Annotated[str | None, AfterValidator(_helo_name)] = None
    # The wait for the reply to the end of an email's content, which a server may
    # send only once it has stored or scanned the email: a timeout then cannot
    # tell whether it was taken, and the retry may deliver it twice.
    smtp_data_timeout: float = Field(default=60.0, gt=0)
    # The envelope sender and the From address, kept with its domain in IDNA.
    mail_from: Annotated[str, AfterValidator(_mail_from)] = (
        "notifications@notiflow.localhost"
    )
    mail_from_name: Annotated[str, AfterValidator(_mail_from_name)] = "notiflow"
    # The right-hand side of every Message-ID, kept in IDNA.
    mail_domain: Annotated[str, AfterValidator(_mail_domain)] = "notiflow.localhost"
    # The base of each email's unsubscribe link, as the dispatcher's links; written
    # in ASCII (a WebUrl is), as the List-Unsubscribe header needs.
    public_url: WebUrl = "http://127.0.0.1:8081"
    # Also bounds the SMTP connections: at most BATCH_WORKERS times this many.
    email_batch_size: int = Field(default=25, ge=1)
    # Room for a full batch in every worker; a batch is never larger than what the
    # broker has handed over.
    email_prefetch: int = Field(default=25 * BATCH_WORKERS, ge=1, le=MAX_PREFETCH)
    email_lease_seconds: float = Field(default=120.0, gt=0)
    email_sweep_seconds: float = Field(default=15.0, gt=0)

    @model_validator(mode="after")
    def _lease_outlives_a_delivery(self) -> EmailSettings:
        # A lease shorter than the longest SMTP conversation would let the sweeper
        # hand a row to a second worker while the first is still sending it.
        longest = self.smtp_conversation_seconds
        if self.email_lease_seconds <= longest:
            raise ValueError(
                f"NOTIFLOW_EMAIL_LEASE_SECONDS ({self.email_lease_seconds:g}) must be "
                f"longer than one whole SMTP conversation may take ({longest:g}s: "
                f"{smtp.DEADLINE_FACTOR} x NOTIFLOW_SMTP_TIMEOUT + "
                "NOTIFLOW_SMTP_DATA_TIMEOUT)"
            )
        prefetch_holds_batch("email", self.email_prefetch, self.email_batch_size)
        return self

    @model_validator(mode="after")
    def _one_way_to_encrypt_and_log_in(self) -> EmailSettings:
        if self.smtp_use_tls and self.smtp_starttls:
            raise ValueError(
                "NOTIFLOW_SMTP_USE_TLS and NOTIFLOW_SMTP_STARTTLS are both true; "
                "choose one: USE_TLS for a server that speaks TLS from the start "
                "(usually port 465), STARTTLS for one that upgrades a plain "
                "connection (usually port 587)"
            )
        for name in ("smtp_username", "smtp_password"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ValueError(
                    f"NOTIFLOW_{name.upper()} is set but empty; set it, or unset "
                    "both it and its partner for no authentication"
                )
        if (self.smtp_username is None) != (self.smtp_password is None):
            given, missing = (
                ("USERNAME", "PASSWORD")
                if self.smtp_password is None
                else ("PASSWORD", "USERNAME")
            )
            raise ValueError(
                f"NOTIFLOW_SMTP_{given} is set without NOTIFLOW_SMTP_{missing}; "
                "SMTP authentication needs both"
            )
        return self

    @property
    def start_tls(self) -> bool | None:
        """STARTTLS: as set; unset, when the server offers it, but required
        when the sender logs in over a connection not encrypted from the start,
        so that the password is never sent in the clear (an attacker on the way
        can strip STARTTLS from the server's offer)."""
        if self.smtp_starttls is None and self.smtp_username and not self.smtp_use_tls:
            return True
        return self.smtp_starttls

    @property
    def smtp_conversation_seconds(self) -> float:
        """The longest one whole SMTP conversation may take."""
        return smtp.deadline(self.smtp_timeout, self.smtp_data_timeout)


def _warn_of_a_bare_host_name(settings: EmailSettings) -> None:
    """Say so when EHLO would give a name that is not fully qualified: this
    host's own, with ``NOTIFLOW_SMTP_HELO_NAME`` unset. Development sinks take
    it; relays that want a fully qualified name refuse every email."""
    if settings.smtp_helo_name is not None:
        return
    name = socket.getfqdn()
    if "." not in name.strip("."):
        logger.warning(
            "this host calls itself %r, which is not fully qualified: the email "
            "sender says EHLO %s, which relays that want a fully qualified name "
            "refuse; set NOTIFLOW_SMTP_HELO_NAME",
            name,
            name,
            extra={"action": "email.bare_helo_name"},
        )


def _warn_of_a_short_drain(settings: EmailSettings) -> None:
    """Say at start if a stop may cut an email short, which may send it twice.

    Not refused: a short drain is a choice (a development machine, a platform
    that allows no longer), and the lease still sends such an email again.
    """
    longest = settings.smtp_conversation_seconds
    if settings.drain_seconds < longest:
        logger.warning(
            "NOTIFLOW_DRAIN_SECONDS (%g) is shorter than one whole SMTP "
            "conversation may take (%gs): an email still being sent when a stop's "
            "drain runs out is sent again once its lease has run out, and its "
            "recipient may get two copies",
            settings.drain_seconds,
            longest,
            extra={"action": "email.short_drain"},
        )


def create_app(settings: EmailSettings | None = None) -> FastAPI:
    settings = settings or EmailSettings()
    _warn_of_a_short_drain(settings)
    _warn_of_a_bare_host_name(settings)
    runtime = Runtime(
        settings,
        relay=True,
        consumers=True,
        pool_options={"server_settings": GENERIC_PLANS},
    )
    config = smtp.SmtpConfig(
        host=settings.smtp_host,
        port=settings.smtp_port,
        timeout=settings.smtp_timeout,
        data_timeout=settings.smtp_data_timeout,
        username=settings.smtp_username,
        password=settings.smtp_password,
        use_tls=settings.smtp_use_tls,
        start_tls=settings.start_tls,
        helo_name=settings.smtp_helo_name,
    )

    # One connection for every email that may be in flight at once, so a claimed
    # row never waits for one and its lease need only cover one SMTP conversation.
    # The prefetch does not bound them: a DeliveryBatch message carries many rows.
    # The pool opens a connection only when no idle one is left.
    in_flight = settings.email_batch_size * BATCH_WORKERS
    transport = smtp.SmtpPool(config, size=in_flight)
    worker = EmailWorker(
        lambda: runtime.db,
        transport,
        sender=settings.mail_from,
        sender_name=settings.mail_from_name,
        domain=settings.mail_domain,
        public_url=settings.public_url,
        secret_key=settings.secret_key,
        retry_delays=settings.retry_delay_levels,
        lease_seconds=settings.email_lease_seconds,
    )
    runtime.subscribe_batch(
        topology.delivery_queue("email"),
        DeliveryRequested,
        worker,
        prefetch=settings.email_prefetch,
        max_batch=settings.email_batch_size,
        workers=BATCH_WORKERS,
        # A batch waiting on a slow conversation holds only its unsent emails'
        # places, and after SLOW_BATCH_SECONDS no worker's.
        max_items=in_flight,
        slow_after=SLOW_BATCH_SECONDS,
        action="email",
        envelope=DeliveryBatch,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Each part is stopped, last started first, whatever the others do.
        async with contextlib.AsyncExitStack() as parts:
            parts.push_async_callback(transport.close)
            await runtime.start()
            parts.push_async_callback(runtime.stop)
            app.state.sweeper = LeaseSweeper.of_sender(
                runtime.db,
                settings,
                "email",
                interval=settings.email_sweep_seconds,
                grace_seconds=settings.email_lease_seconds,
            ).started_in(parts)
            yield

    app = FastAPI(
        title="notiflow email sender",
        lifespan=lifespan,
        telemetry=tracing.fastapi_telemetry(),
    )
    app.state.runtime = runtime
    install_http_policy(
        app, settings.max_request_bytes, body_seconds=settings.http_body_timeout
    )
    app.include_router(health_router(runtime))
    return app
