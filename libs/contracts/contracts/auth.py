"""Bearer tokens: HMAC-signed JWTs naming a user, with an expiry; and the tokens
of unsubscribe links, which are no bearer tokens (see below).

``notiflow-token USERNAME`` prints a token for a user stored in the database.

A front end sends the same token with every request until it expires, and checking
it (base64, HMAC, JSON, claims) cost about 37 µs each time. So a token that passed
is remembered, with its expiry, for the secret it passed with: the same string
again is answered from memory until that expiry, which is still checked on every
use. Nothing else can pass from memory: any other string, a forged one included,
is checked in full, and one that fails is not remembered.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import re
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import asyncpg
import jwt

from contracts.cli import Once
from contracts.settings import (
    MAX_TOKEN_TTL_SECONDS,
    Settings,
    get_settings,
    load_or_exit,
)

ALGORITHM = "HS256"
# Ids are PostgreSQL bigints; a larger number can name no row.
MAX_ID = 2**63 - 1
# A user id as a token's sub writes it: decimal, no sign, no leading zero.
_USER_ID = re.compile(r"[1-9][0-9]{0,18}")
AUDIENCE = "notiflow"
# How far ahead of this host's clock the host that issued a token may be.
CLOCK_SKEW_SECONDS = 60
# Tokens that passed, remembered; each is a few hundred bytes.
REMEMBERED_TOKENS = 4096


class InvalidToken(Exception):
    """The token is missing, malformed, forged or expired; answer 401."""


class UnknownUser(InvalidToken):
    """The token is genuine but names a user who is not stored; answer 401.

    A signature proves only that the token was made with our secret: its user may
    have been deleted since, or never existed. Every service refuses such a token
    as it refuses a forged one, in these words, and stores nothing for it.
    """

    def __init__(self, user_id: int) -> None:
        super().__init__(f"the token names user {user_id}, who does not exist")
        self.user_id = user_id


@dataclass(frozen=True)
class Principal:
    user_id: int
    username: str


def issue_token(
    user_id: int, username: str, settings: Settings, ttl_seconds: int | None = None
) -> str:
    now = int(time.time())
    ttl = settings.token_ttl_seconds if ttl_seconds is None else ttl_seconds
    claims = {
        "sub": str(user_id),
        "name": username,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + ttl,
    }
    return jwt.encode(claims, settings.secret_key, algorithm=ALGORITHM)


def verify_token(token: str | None, settings: Settings) -> Principal:
    if not token:
        raise InvalidToken("missing bearer token")
    try:
        principal, expires = _verified(token, settings.secret_key)
    except jwt.ExpiredSignatureError:
        raise InvalidToken("token has expired") from None
    except jwt.ImmatureSignatureError:
        raise InvalidToken(
            "token is not valid yet: it says it was issued, or becomes valid, more "
            f"than {CLOCK_SKEW_SECONDS}s ahead of this server's clock"
        ) from None
    except (jwt.InvalidTokenError, ValueError):
        raise InvalidToken("token is invalid") from None
    # PyJWT's rule: a token is expired from the second its exp names.
    if expires <= _now():
        raise InvalidToken("token has expired")
    return principal


@lru_cache(maxsize=REMEMBERED_TOKENS)
def _verified(token: str, secret: str) -> tuple[Principal, int]:
    """The token's principal and expiry, if its signature and claims hold now.

    Raises PyJWT's errors or ValueError, which are never cached: a token that fails
    is checked again in full each time.
    """
    claims = jwt.decode(
        token,
        secret,
        algorithms=[ALGORITHM],
        audience=AUDIENCE,
        options={"require": ["sub", "exp", "aud"]},
        # For iat and nbf: the host that issued the token may be a little ahead
        # of this one. exp is checked to the second by the caller.
        leeway=CLOCK_SKEW_SECONDS,
    )
    # As issue_token writes it: plain decimal digits. int() would also take
    # " 2", "0_2" or "٢" for user 2.
    sub = claims["sub"]
    if not (isinstance(sub, str) and _USER_ID.fullmatch(sub)):
        raise ValueError("sub is not a user id")
    user_id = int(sub)
    if not 0 < user_id <= MAX_ID:
        raise ValueError("sub is not a user id")
    principal = Principal(user_id=user_id, username=str(claims.get("name")))
    # PyJWT takes only a whole number, of any size: kept an int, for no float
    # can hold every one.
    return principal, int(claims["exp"])


def _now() -> float:
    return time.time()


def bearer(authorization: str | None) -> str | None:
    """The token in an ``Authorization: Bearer …`` header, if there is one."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def _lookup(settings: Settings, username: str) -> int | None:
    conn = await asyncpg.connect(settings.database_url, timeout=5)
    try:
        return await conn.fetchval("SELECT id FROM users WHERE username = $1", username)
    finally:
        await conn.close()


def _lifetime(value: str) -> int:
    """A ``--ttl``: a token of 0 seconds or fewer has expired when it is printed."""
    try:
        seconds = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be whole seconds, got {value!r}"
        ) from None
    if seconds < 1:
        raise argparse.ArgumentTypeError(
            f"must be 1 second or more, got {seconds}: such a token would have "
            "expired when it is printed"
        )
    if seconds > MAX_TOKEN_TTL_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_TOKEN_TTL_SECONDS} seconds (366 days), got "
            f"{seconds}: a token cannot be taken back before it expires"
        )
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Print a bearer token for a user.",
        usage="%(prog)s [-h] [--ttl TTL] username",
    )
    # Optional to argparse, so that an option it does not know is named before a
    # missing user name is (argparse would name only the user name).
    parser.add_argument("username", nargs="?")
    parser.add_argument(
        "--ttl", type=_lifetime, action=Once, help="lifetime in seconds"
    )
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.username is None:
        parser.error("the following arguments are required: username")

    from contracts.preflight import require_services

    settings = load_or_exit(get_settings)
    require_services(settings, broker=False, migrated=True)
    user_id = asyncio.run(_lookup(settings, args.username))
    if user_id is None:
        sys.exit(f"no user named {args.username!r}; seeded users: alice bob carol dave")
    print(issue_token(user_id, args.username, settings, args.ttl))


# Unsubscribe links
#
# An email carries a link that turns its channel type off for its recipient without
# signing in (RFC 2369 List-Unsubscribe, RFC 8058 one-click). Its token is
# ``<user id>.<channel type>.<signature>``, the signature an HMAC-SHA256 of the
# purpose, the user id and the type under the secret key, in unpadded base64url: one
# token per user and type, so the dispatcher's link in the body and the email
# sender's in the headers are the same URL.
#
# The signed text starts with a purpose and holds NUL bytes, which the signing input
# of a bearer token (base64url and dots) never does: neither kind of token passes as
# the other, whatever its parts say.
#
# Such a token never expires, for a link in an email read years later must still
# work; all it can do is turn notification emails off. Rotating NOTIFLOW_SECRET_KEY
# invalidates every link sent before, as it does every bearer token.

UNSUBSCRIBE_PURPOSE = b"notiflow unsubscribe link v1"
# The channel types a link may turn off; emails are the only ones that carry one.
UNSUBSCRIBE_TYPES = ("email",)
_LINK_TOKEN = re.compile(r"([1-9][0-9]{0,18})\.([a-z]{1,16})\.([A-Za-z0-9_-]{43})")


class InvalidLinkToken(Exception):
    """An unsubscribe link's token is missing, malformed or forged; answer 4xx."""


@dataclass(frozen=True)
class Unsubscribe:
    """What a genuine unsubscribe token asks for."""

    user_id: int
    channel_type: str


def unsubscribe_token(
    user_id: int, secret_key: str, channel_type: str = "email"
) -> str:
    """The token of the link that turns ``channel_type`` off for ``user_id``."""
    if not 0 < user_id <= MAX_ID:
        raise ValueError(f"user id must be 1 to {MAX_ID}, not {user_id}")
    if channel_type not in UNSUBSCRIBE_TYPES:
        raise ValueError(
            f"channel type must be one of {', '.join(UNSUBSCRIBE_TYPES)}, "
            f"not {channel_type!r}"
        )
    signature = _link_signature(user_id, channel_type, secret_key)
    return f"{user_id}.{channel_type}.{signature}"


def unsubscribe_url(public_url: str, user_id: int, secret_key: str) -> str:
    """The link, under ``public_url``, that turns notification emails off."""
    token = unsubscribe_token(user_id, secret_key)
    return f"{public_url.rstrip('/')}/unsubscribe?token={token}"


def verify_unsubscribe_token(token: str | None, secret_key: str) -> Unsubscribe:
    """What ``token`` asks for, or :class:`InvalidLinkToken` saying what is wrong."""
    if not token:
        raise InvalidLinkToken("the token is missing")
    parts = _LINK_TOKEN.fullmatch(token)
    if parts is None:
        raise InvalidLinkToken("the token is not an unsubscribe link's token")
    user_id, channel_type, signature = int(parts[1]), parts[2], parts[3]
    if user_id > MAX_ID or channel_type not in UNSUBSCRIBE_TYPES:
        raise InvalidLinkToken("the token is not an unsubscribe link's token")
    expected = _link_signature(user_id, channel_type, secret_key)
    if not hmac.compare_digest(signature.encode("ascii"), expected.encode("ascii")):
        raise InvalidLinkToken("the token is invalid: its signature does not match")
    return Unsubscribe(user_id=user_id, channel_type=channel_type)


def _link_signature(user_id: int, channel_type: str, secret_key: str) -> str:
    signed = b"\0".join(
        [UNSUBSCRIBE_PURPOSE, str(user_id).encode(), channel_type.encode()]
    )
    digest = hmac.digest(secret_key.encode(), signed, hashlib.sha256)
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
