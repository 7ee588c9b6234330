"""The push sender's settings, on top of the ones every service shares."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from contracts.settings import MAX_PREFETCH, Settings, is_host
from push_sender.endpoints import canonical_host
from push_sender.transport import POOL_CONNECTIONS

_SUBJECT = "must be a mailto: or https: URL (RFC 8292), as in mailto:ops@example.com"
# An address as a push service can read it: no spaces, one @, something on
# either side; RFC 6068 headers after a ? are left alone.
_MAILBOX = re.compile(r"[^@\s?]+@[^@\s?]+")


def subject_problem(value: str) -> str | None:
    """Why ``value`` cannot be a VAPID ``sub`` claim, or None.

    Push services refuse a token whose subject is neither, Apple's with a 403
    for every push, so a typo here would fail every delivery to its devices.
    """
    if any(c.isspace() for c in value) or not value.isascii():
        return f"{_SUBJECT}, with no spaces and in ASCII"
    if value.startswith("mailto:"):
        if _MAILBOX.fullmatch(value.removeprefix("mailto:").partition("?")[0]):
            return None
        return f"{_SUBJECT}; its address must be user@domain"
    if value.startswith("https://"):
        try:
            parts = urlsplit(value)
            unreadable = parts.port == 0  # and raises on one that is no number
        except ValueError:
            unreadable = True
        if unreadable:
            return f"{_SUBJECT}; it cannot be read as a URL"
        if not parts.hostname or not is_host(parts.hostname):
            return f"{_SUBJECT}; it names no host"
        if parts.username is not None or parts.password is not None:
            return f"{_SUBJECT}, with no user name or password"
        return None
    return _SUBJECT


def allowed_host_problem(entry: str) -> str | None:
    """Why ``entry`` of the push allow-list is no host name, or None."""
    shown = repr(entry if len(entry) <= 60 else f"{entry[:60]}...")
    wanted = (
        "list push services by host name or IP address alone, as in "
        "fcm.googleapis.com,updates.push.services.mozilla.com"
    )
    if entry == "*" or entry.startswith("*."):
        return f"{shown} is not taken: no wildcards; {wanted}"
    if not entry.isascii():
        return f"{shown} is not ASCII (write a host in its xn-- form); {wanted}"
    if entry.startswith("[") and entry.endswith("]"):
        return f"{shown}: write an IPv6 address without [ ]; {wanted}"
    if not is_host(entry):
        return f"{shown} is not a host name (no scheme, port or path); {wanted}"
    return None


class PushSettings(Settings):
    model_config = SettingsConfigDict(env_prefix="NOTIFLOW_", extra="ignore")

    # A path to a PEM file, or the PEM text itself. Unset in development: a pair is
    # generated once and kept under ``<var_dir>/vapid/``.
    vapid_private_key: str | None = None
    # Optional; when set it must match the private key (a cheap guard against
    # deploying the page's key with another server's private key).
    vapid_public_key: str | None = None
    vapid_subject: str = "mailto:ops@notiflow.localhost"
    var_dir: Path | None = None

    # Hosts a subscription endpoint may point at, comma separated; empty means any
    # public host. Plain http is accepted only in test mode, and only for these.
    push_allowed_hosts: str = ""
    # Origins of the page that calls the subscription API; None means the
    # development default in development and nothing elsewhere.

    # Subscriptions one user may have: each is a URL the server POSTs to for every
    # push notification of theirs. A new browser past it replaces their least
    # recently subscribed one. One notification's pushes go out at once, each on a
    # connection of its own, so at most the pool's connections.
    push_max_subscriptions_per_user: int = Field(default=10, ge=1, le=POOL_CONNECTIONS)

    push_ttl_seconds: int = Field(default=24 * 3600, ge=0, le=28 * 24 * 3600)
    push_timeout: float = Field(default=10.0, gt=0)
    # How long an endpoint's host may take to resolve, when a browser subscribes
    # and before each connection.
    push_resolve_timeout: float = Field(default=3.0, gt=0)
    push_prefetch: int = Field(default=20, ge=1, le=MAX_PREFETCH)
    push_lease_seconds: float = Field(default=120.0, gt=0)
    push_sweep_seconds: float = Field(default=15.0, gt=0)

    @field_validator("vapid_subject")
    @classmethod
    def _vapid_subject(cls, value: str) -> str:
        if problem := subject_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("push_allowed_hosts")
    @classmethod
    def _push_allowed_hosts(cls, value: str) -> str:
        # A host no endpoint can have would block every push service unnoticed,
        # since a non-empty list lets only its own hosts through.
        for entry in (e.strip() for e in value.split(",")):
            if entry and (problem := allowed_host_problem(entry)):
                raise ValueError(problem)
        return value

    @property
    def allowed_hosts(self) -> frozenset[str]:
        return frozenset(
            canonical_host(h.strip())
            for h in self.push_allowed_hosts.split(",")
            if h.strip()
        )

    @property
    def allow_plain_http(self) -> bool:
        """Plain http endpoints: only for a stand-in push service under test."""
        return self.env == "test" and bool(self.allowed_hosts)

    @model_validator(mode="after")
    def _require_key_in_production(self) -> PushSettings:
        if self.env == "production" and not self.vapid_private_key:
            raise ValueError(
                "NOTIFLOW_VAPID_PRIVATE_KEY is not set; production never generates "
                "VAPID keys, because every browser subscription is bound to the key"
            )
        # A lease shorter than one delivery (a request and, after a 413, a second
        # one; devices go in parallel) would let the sweeper hand the row to a
        # second worker while the first is still pushing it.
        longest = 2 * self.push_timeout
        if self.push_lease_seconds <= longest:
            raise ValueError(
                f"NOTIFLOW_PUSH_LEASE_SECONDS ({self.push_lease_seconds:g}) must be "
                f"longer than one delivery may take ({longest:g}s)"
            )
        return self
