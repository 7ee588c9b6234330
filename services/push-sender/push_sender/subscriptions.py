"""Push subscriptions: what a browser hands us, the rules it must meet, the SQL.

A subscription arrives as ``PushSubscription.toJSON()``. The endpoint is where the
sender will POST later, so it is a server-side request target chosen by a user:
it must be https, and on a host of the allow-list when one is configured; with no
allow-list, loopback, private and link-local addresses are refused. Plain http is
accepted only in test mode, and only for allow-listed hosts, which is how the
tests' stand-in push service on 127.0.0.1 is reached.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, field_validator

from push_sender.vapid import b64url_decode

MAX_ENDPOINT_CHARS = 2048


class Keys(BaseModel):
    model_config = ConfigDict(extra="ignore")

    p256dh: str = Field(max_length=200)
    auth: str = Field(max_length=100)

    @field_validator("p256dh")
    @classmethod
    def _point(cls, value: str) -> str:
        raw = _decode(value)
        if len(raw) != 65 or raw[0] != 0x04:
            raise ValueError(
                f"must be an uncompressed P-256 point (65 bytes starting 0x04), "
                f"got {len(raw)} bytes"
            )
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
        except ValueError:
            raise ValueError("is not a point on the P-256 curve") from None
        return value

    @field_validator("auth")
    @classmethod
    def _secret(cls, value: str) -> str:
        raw = _decode(value)
        if len(raw) != 16:
            raise ValueError(f"must decode to 16 bytes, got {len(raw)}")
        return value


class NewSubscription(BaseModel):
    """The body of ``POST /push/subscriptions``."""

    model_config = ConfigDict(extra="ignore")

    endpoint: str = Field(min_length=1, max_length=MAX_ENDPOINT_CHARS)
    # Stored nowhere: push services answer 404/410 once it has passed.
    expiration_time: float | None = Field(default=None, alias="expirationTime")
    keys: Keys


def _decode(value: str) -> bytes:
    try:
        return b64url_decode(value)
    except ValueError:
        raise ValueError("must be unpadded base64url") from None


def endpoint_problem(
    url: str, allowed_hosts: frozenset[str], allow_plain_http: bool
) -> str | None:
    """Why ``url`` may not be a push endpoint, or None when it may."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        _ = parts.port  # raises on a malformed port
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    if parts.scheme not in ("https", "http") or not host:
        return "must be an https URL"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials"
    if allowed_hosts and host not in allowed_hosts:
        return f"host {host!r} is not an allowed push service"
    if parts.scheme == "http" and not (allow_plain_http and host in allowed_hosts):
        return "must be an https URL"
    if not allowed_hosts and not _public(host):
        return f"host {host!r} is not a public address"
    return None


def _public(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return True  # a name; push services are reached by name
    return address.is_global


UPSERT = """
INSERT INTO push_subscriptions (user_id, endpoint, p256dh, auth, user_agent)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (endpoint) DO UPDATE
SET user_id = EXCLUDED.user_id, p256dh = EXCLUDED.p256dh, auth = EXCLUDED.auth,
    user_agent = EXCLUDED.user_agent
RETURNING id, endpoint, user_agent, created_at, last_success_at
"""

LIST_OWN = """
SELECT id, endpoint, user_agent, created_at, last_success_at
FROM push_subscriptions WHERE user_id = $1 ORDER BY id
"""

DELETE_OWN = (
    "DELETE FROM push_subscriptions WHERE id = $1 AND user_id = $2 RETURNING id"
)

FOR_USER = """
SELECT id, endpoint, p256dh, auth FROM push_subscriptions
WHERE user_id = $1 ORDER BY id
"""

# The endpoint is matched too: a browser that subscribed again meanwhile keeps
# its new row.
DELETE_GONE = "DELETE FROM push_subscriptions WHERE id = $1 AND endpoint = $2"

TOUCH = "UPDATE push_subscriptions SET last_success_at = now() WHERE id = ANY($1)"
