"""Who may use the gateway: a valid token that names a user who exists.

A signature proves that the token was issued with our secret, not that its user
is still there: a user deleted after sign-in, or a token made by hand for an id
that was never used, would otherwise get an empty inbox and a live stream. So
every request and every new stream looks its user up once, by primary key.
Nothing is cached across requests; an open stream is not checked again and ends,
at the latest, when its token expires.
"""

from __future__ import annotations

import asyncpg

from contracts.auth import UnknownUser
from sse_gateway.inbox import MAX_ID

USER_EXISTS = "SELECT 1 FROM users WHERE id = $1"


async def require_user(pg: asyncpg.Connection, user_id: int) -> None:
    """Raise :class:`UnknownUser` (answer 401) unless the user is stored."""
    # An id outside bigint cannot be stored, and asyncpg would refuse to send it.
    if not 1 <= user_id <= MAX_ID:
        raise UnknownUser(user_id)
    if await pg.fetchval(USER_EXISTS, user_id) is None:
        raise UnknownUser(user_id)
