"""Routes of the inbox and preferences API; every route checks the token.

The event stream itself is served by :class:`sse_gateway.stream.StreamEndpoint`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Depends, Query, Request

from contracts.auth import Principal
from contracts.db import connection, transaction
from contracts.http import NoBody, NotFound, PathId, UserDep, Whole
from sse_gateway import inbox, preferences
from sse_gateway.access import require_user

logger = logging.getLogger(__name__)

router = APIRouter()


async def principal(request: Request, user: UserDep) -> Principal:
    # ``UserDep`` reads the token (a ``?token=`` arrives as its header, see
    # app.GatewayApp); the HTTP policy knows that dependency, and refuses a bad
    # token with it before a body it could not parse.
    async with connection(request.app.state.runtime.db) as pg:
        await require_user(pg, user.user_id)
    return user


async def pool(request: Request) -> asyncpg.Pool:
    # A coroutine: FastAPI would run a plain function in its thread pool.
    return request.app.state.runtime.db


User = Annotated[Principal, Depends(principal)]
Pool = Annotated[asyncpg.Pool, Depends(pool)]
# A notification id in a path, in canonical decimal; beyond bigint it can name no
# row (422, not 500).
NotificationId = PathId


@router.get("/inbox")
async def list_inbox(
    user: User,
    db: Pool,
    limit: Annotated[int, Whole, Query(ge=1, le=100)] = 20,
    cursor: Annotated[int | None, Whole, Query(ge=1, le=inbox.MAX_ID)] = None,
) -> dict[str, Any]:
    """The user's inbox, newest first; pass ``next_cursor`` back for the next page."""
    async with (
        connection(db) as pg,
        # One snapshot, so the page and the unread count agree with each other.
        pg.transaction(isolation="repeatable_read", readonly=True),
    ):
        # One row more than the page, to know whether another page follows.
        rows = await pg.fetch(inbox.LIST, user.user_id, cursor, limit + 1)
        unread = await pg.fetchval(inbox.UNREAD, user.user_id)
    items = [inbox.event(row) for row in rows[:limit]]
    next_cursor = items[-1]["seq"] if len(rows) > limit else None
    return {"items": items, "next_cursor": next_cursor, "unread": unread}


@router.get("/inbox/unread-count")
async def unread_count(user: User, db: Pool) -> dict[str, int]:
    async with connection(db) as pg:
        return {"unread": await pg.fetchval(inbox.UNREAD, user.user_id)}


async def _read_state_change(
    db: asyncpg.Pool,
    user_id: int,
    kind: str,
    statement: str,
    *args: Any,
    own: int | None = None,
) -> tuple[list[int], int]:
    """Apply one read-state change and tell the user's other streams about it.

    ``own`` names a notification that must be in the user's inbox (else 404).
    """
    async with transaction(db, timeout=5) as pg:
        if own is not None and await pg.fetchval(inbox.OWNS, user_id, own) is None:
            raise NotFound(f"notification {own} is not in your inbox")
        # Serialise read-state changes per user, so the unread count announced with
        # each change is the count after it, in commit order.
        await pg.execute(
            "SELECT 1 FROM inbox_sequences WHERE user_id = $1 FOR UPDATE", user_id
        )
        ids = [r["id"] for r in await pg.fetch(statement, user_id, *args)]
        unread = await pg.fetchval(inbox.UNREAD, user_id)
        if ids:
            await inbox.announce(
                pg, {"kind": kind, "u": user_id, "ids": ids, "unread": unread}
            )
    return ids, unread


@router.post("/inbox/{notification_id}/read")
async def mark_read(
    notification_id: NotificationId, user: User, db: Pool, _: NoBody
) -> dict[str, Any]:
    ids, unread = await _read_state_change(
        db,
        user.user_id,
        "read",
        inbox.MARK_READ,
        [notification_id],
        own=notification_id,
    )
    return {"marked": ids, "unread": unread}


@router.post("/inbox/read-all")
async def mark_all_read(user: User, db: Pool, _: NoBody) -> dict[str, Any]:
    ids, unread = await _read_state_change(
        db, user.user_id, "read", inbox.MARK_ALL_READ
    )
    return {"marked": ids, "unread": unread}


@router.post("/inbox/{notification_id}/archive")
async def archive(
    notification_id: NotificationId, user: User, db: Pool, _: NoBody
) -> dict[str, Any]:
    ids, unread = await _read_state_change(
        db,
        user.user_id,
        "archived",
        inbox.ARCHIVE,
        notification_id,
        own=notification_id,
    )
    return {"archived": ids, "unread": unread}


@router.get("/preferences")
async def get_preferences(user: User, db: Pool) -> dict[str, bool]:
    """Every channel type, and whether the user wants it (true unless turned off)."""
    async with connection(db) as pg:
        return await preferences.read(pg, user.user_id)


@router.patch("/preferences")
async def change_preferences(
    change: preferences.PreferenceChange, user: User, db: Pool
) -> dict[str, bool]:
    """Turn the channel types named in the body on or off; the others keep theirs.

    Turning one off also skips the user's notifications of it not yet sent; see
    :mod:`sse_gateway.preferences`.
    """
    async with connection(db) as pg:
        changed = await preferences.change(pg, user.user_id, change.given())
    changed.log(logger, user.user_id)
    return changed.wanted
