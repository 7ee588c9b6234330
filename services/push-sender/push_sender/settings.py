"""The push sender's settings, on top of the ones every service shares."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from contracts.settings import Settings


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

    push_ttl_seconds: int = Field(default=24 * 3600, ge=0, le=28 * 24 * 3600)
    push_timeout: float = Field(default=10.0, gt=0)
    # How long an endpoint's host may take to resolve, when a browser subscribes
    # and before each connection.
    push_resolve_timeout: float = Field(default=3.0, gt=0)
    push_prefetch: int = Field(default=20, ge=1)
    push_lease_seconds: float = Field(default=120.0, gt=0)
    push_sweep_seconds: float = Field(default=15.0, gt=0)

    @property
    def allowed_hosts(self) -> frozenset[str]:
        return frozenset(
            h.strip().lower() for h in self.push_allowed_hosts.split(",") if h.strip()
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
