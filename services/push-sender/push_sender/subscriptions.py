"""Push subscriptions: what a browser hands us, the shape it must have, the SQL.

A subscription arrives as ``PushSubscription.toJSON()``: ``endpoint``,
``expirationTime`` and ``keys`` with ``p256dh`` and ``auth``, and nothing else; a
field we do not know is refused rather than dropped, so a client that thinks it
can set one (``user_id``) learns that it cannot. Where the endpoint may point is
``endpoints``' concern.
"""

from __future__ import annotations

import re

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, field_validator

from push_sender.vapid import b64url_decode

MAX_ENDPOINT_CHARS = 2048


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
    # Stored nowhere: push services answer 404/410 once it has passed.
    expiration_time: float | None = Field(default=None, alias="expirationTime")
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


def _decode(value: str) -> bytes:
    try:
        return b64url_decode(value)
    except ValueError:
        raise ValueError("must be unpadded base64url") from None


# Subscribing runs these three in one transaction. An endpoint is one browser's;
# when someone else signs in on that browser and subscribes, the endpoint moves to
# them as a new row (new id, created_at now, no last success), so nothing of the
# previous owner's registration reaches the new one. The lock makes two people
# subscribing the same endpoint at once take turns; without it the loser's
# upsert could update a row the winner's delete never saw.
LOCK_ENDPOINT = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"

RELEASE_FROM_OTHERS = (
    "DELETE FROM push_subscriptions WHERE endpoint = $1 AND user_id <> $2"
)

# Only the owner's own row is left to conflict with: the same browser subscribing
# again, whose keys may have changed.
UPSERT = """
INSERT INTO push_subscriptions (user_id, endpoint, p256dh, auth, user_agent)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (endpoint) DO UPDATE
SET p256dh = EXCLUDED.p256dh, auth = EXCLUDED.auth,
    user_agent = EXCLUDED.user_agent
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

FOR_USER = """
SELECT id, endpoint, p256dh, auth FROM push_subscriptions
WHERE user_id = $1 ORDER BY id
"""

# The endpoint is matched too: a browser that subscribed again meanwhile keeps
# its new row.
DELETE_GONE = "DELETE FROM push_subscriptions WHERE id = $1 AND endpoint = $2"

TOUCH = "UPDATE push_subscriptions SET last_success_at = now() WHERE id = ANY($1)"
