"""Bearer tokens: HMAC-signed JWTs naming a user, with an expiry.

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
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import asyncpg
import jwt

from contracts.settings import Settings, get_settings, load_or_exit

ALGORITHM = "HS256"
# Ids are PostgreSQL bigints; a larger number can name no row.
MAX_ID = 2**63 - 1
AUDIENCE = "notiflow"
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
    )
    user_id = int(claims["sub"])
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
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print a bearer token for a user.")
    parser.add_argument("username")
    parser.add_argument("--ttl", type=_lifetime, help="lifetime in seconds")
    args = parser.parse_args(argv)

    from contracts.preflight import require_services

    settings = load_or_exit(get_settings)
    require_services(settings, broker=False, migrated=True)
    user_id = asyncio.run(_lookup(settings, args.username))
    if user_id is None:
        sys.exit(f"no user named {args.username!r}; seeded users: alice bob carol dave")
    print(issue_token(user_id, args.username, settings, args.ttl))
