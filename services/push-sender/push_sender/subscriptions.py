"""Push subscriptions: what a browser hands us, the shape it must have, the SQL.

A subscription arrives as ``PushSubscription.toJSON()``: ``endpoint``,
``expirationTime`` and ``keys`` with ``p256dh`` and ``auth``, and nothing else; a
field we do not know is refused rather than dropped, so a client that thinks it
can set one (``user_id``) learns that it cannot. Where the endpoint may point is
``endpoints``' concern.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, field_validator

from push_sender.vapid import b64url, b64url_decode

MAX_ENDPOINT_CHARS = 2048
# The last millisecond a Python datetime can hold (9999-12-31T23:59:59.999Z).
_LAST_MS = 253_402_300_799_999


# A serialized URL is printable ASCII; anything else (a NUL, a space, a lone
# surrogate) is not an endpoint and could not be stored as text anyway.
_URL_CHARS = re.compile(r"[\x21-\x7e]*")


class Keys(BaseModel):
    model_config = ConfigDict(extra="forbid")

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

    model_config = ConfigDict(extra="forbid")

    endpoint: str = Field(min_length=1, max_length=MAX_ENDPOINT_CHARS)
    # Milliseconds since the epoch (an EpochTimeStamp), or null for none. One that
    # has passed is refused: its push service would answer every push 404/410. A
    # JSON number, as browsers send it: a string or a boolean is refused as such,
    # like every other field's wrong type, not read as a time.
    expiration_time: StrictFloat | None = Field(default=None, alias="expirationTime")
    keys: Keys

    @field_validator("endpoint")
    @classmethod
    def _printable(cls, value: str) -> str:
        match = _URL_CHARS.match(value)
        end = match.end() if match else 0
        if end < len(value):
            raise ValueError(
                f"must be printable ASCII; U+{ord(value[end]):04X} at position {end}"
            )
        return value

    @field_validator("expiration_time")
    @classmethod
    def _future(cls, value: float | None) -> float | None:
        if value is None:
            return None
        if not (math.isfinite(value) and 0 <= value <= _LAST_MS):
            raise ValueError("must be a time in milliseconds since 1970, or null")
        if value <= time.time() * 1000:
            raise ValueError(
                f"has passed ({_from_ms(value).isoformat()}); an expired "
                "subscription can receive nothing, subscribe the browser again"
            )
        return value

    @property
    def expires_at(self) -> datetime | None:
        if self.expiration_time is None:
            return None
        return _from_ms(self.expiration_time)


def _from_ms(value: float) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC)


def _decode(value: str) -> bytes:
    try:
        raw = b64url_decode(value)
    except ValueError:
        raise ValueError("must be unpadded base64url") from None
    # The decoder ignores the unused bits of the last character, so several texts
    # decode to one key; only the one a browser writes is taken.
    if b64url(raw) != value:
        raise ValueError(
            "must be unpadded base64url as browsers write it: the unused bits of "
            "its last character must be zero"
        )
    return raw


# Subscribing runs the statements from here to UPSERT in one transaction. An
# endpoint is one browser's; when someone else signs in on that browser and
# subscribes, the endpoint moves to them as a new row (new id, created_at now, no
# last success), so nothing of the previous owner's registration reaches the new
# one. The lock makes two people subscribing the same endpoint at once take turns;
# without it the loser's upsert could update a row the winner's delete never saw.
LOCK_ENDPOINT = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"

# Who has the endpoint now; with its lock held, no one else can change that.
OWNER = "SELECT user_id FROM push_subscriptions WHERE endpoint = $1"

# A user has at most a configured number of subscriptions, since each is a URL
# the server POSTs to for every notification. A new browser past that number
# replaces the user's least recently subscribed one (created, or posted again by
# its browser), so that signing in somewhere new always works. Subscribing takes
# the lock of every user whose rows it changes, the caller and the endpoint's
# owner, in the order of their ids and before changing any row, so that two
# subscriptions of one user take turns (both could otherwise see room for one
# more) and two that change the same users never wait for each other in a
# circle. The key is the user's id hashed into the endpoints' key space; a
# collision only makes two subscribers take turns.
LOCK_USER = (
    "SELECT pg_advisory_xact_lock(hashtextextended('push user ' || $1::bigint, 0))"
)

RELEASE_FROM_OTHERS = (
    "DELETE FROM push_subscriptions WHERE endpoint = $1 AND user_id <> $2"
)

# The order in which a user's subscriptions were last (re)subscribed, newest first.
NEWEST_FIRST = "ORDER BY greatest(created_at, refreshed_at) DESC, id DESC"

# Keeps the newest $3 of the user's other subscriptions, leaving room for the one
# being posted: none is removed when it is the user's already (a refresh), nor
# when the user is below the limit.
MAKE_ROOM = f"""
DELETE FROM push_subscriptions WHERE id IN (
    SELECT id FROM push_subscriptions WHERE user_id = $1 AND endpoint <> $2
    {NEWEST_FIRST} OFFSET $3
)
RETURNING id
"""

# Only the owner's own row is left to conflict with: the same browser subscribing
# again, whose keys and expiry may have changed.
UPSERT = """
INSERT INTO push_subscriptions (user_id, endpoint, p256dh, auth, user_agent, expires_at)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (endpoint) DO UPDATE
SET p256dh = EXCLUDED.p256dh, auth = EXCLUDED.auth,
    user_agent = EXCLUDED.user_agent, expires_at = EXCLUDED.expires_at,
    refreshed_at = now()
RETURNING id, endpoint, user_agent, created_at, last_success_at
"""

# Asked before an endpoint's host is resolved (see ``api.subscribe``).
USER_EXISTS = "SELECT EXISTS (SELECT FROM users WHERE id = $1)"

# The statements of a user's requests also say whether the user exists, so that a
# token for a missing user is refused without another round trip. LIST_OWN returns
# no row for a missing user, and one row of NULLs for a user with no subscriptions.
LIST_OWN = """
SELECT s.id, s.endpoint, s.user_agent, s.created_at, s.last_success_at
FROM users u LEFT JOIN push_subscriptions s ON s.user_id = u.id
WHERE u.id = $1 ORDER BY s.id
"""

DELETE_OWN = """
WITH gone AS (
    DELETE FROM push_subscriptions WHERE id = $1 AND user_id = $2 RETURNING id
)
SELECT EXISTS (SELECT FROM users WHERE id = $2) AS user_exists,
       EXISTS (SELECT FROM gone) AS deleted
"""

# The newest $2 only: a user above the limit (subscribed before there was one, or
# before it was lowered) gets no more pushes sent than the limit allows, until the
# next subscription trims the rest.
FOR_USER = f"""
SELECT id, endpoint, p256dh, auth, expires_at FROM push_subscriptions
WHERE user_id = $1 {NEWEST_FIRST} LIMIT $2
"""

# The endpoint is matched too: a browser that subscribed again meanwhile keeps
# its new row.
DELETE_GONE = "DELETE FROM push_subscriptions WHERE id = $1 AND endpoint = $2"

# Likewise, a browser that subscribed again meanwhile has a new expiry.
DELETE_EXPIRED = "DELETE FROM push_subscriptions WHERE id = $1 AND expires_at <= now()"

TOUCH = "UPDATE push_subscriptions SET last_success_at = now() WHERE id = ANY($1)"
