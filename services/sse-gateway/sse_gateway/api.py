"""Routes: the event stream and the inbox API. Every route checks the token."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Depends, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from contracts.auth import Principal, bearer, verify_token
from contracts.db import connection, transaction
from contracts.http import NotFound
from sse_gateway import inbox
from sse_gateway.hub import Connection, Hub

logger = logging.getLogger(__name__)

REPLAY_PAGE = 500
router = APIRouter()


def principal(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    token: Annotated[str | None, Query()] = None,
) -> Principal:
    # EventSource cannot set headers, so browsers pass the token in the query.
    settings = request.app.state.runtime.settings
    return verify_token(bearer(authorization) or token, settings)


def pool(request: Request) -> asyncpg.Pool:
    return request.app.state.runtime.db


User = Annotated[Principal, Depends(principal)]
Pool = Annotated[asyncpg.Pool, Depends(pool)]


@router.get("/sse")
async def stream(
    request: Request,
    user: User,
    db: Pool,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    hub: Hub = request.app.state.hub
    settings = request.app.state.runtime.settings
    conn = Connection(user.user_id)
    # Join the hub before reading the cursor: an event committed in between is then
    # both queued and in the replay, and the sequence check drops the second copy.
    hub.add(conn)
    try:
        async with connection(db) as pg:
            start = await _cursor(pg, user.user_id, last_event_id)
    except BaseException:
        hub.remove(conn)
        raise
    return EventSourceResponse(
        _events(conn, hub, db, start, settings.sse_retry_ms),
        ping=settings.sse_heartbeat_seconds,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        send_timeout=settings.sse_send_timeout,
    )


async def _cursor(
    pg: asyncpg.Connection, user_id: int, last_event_id: str | None
) -> tuple[int, bool]:
    """Where the stream starts: (sequence number, whether to replay from it)."""
    if last_event_id and last_event_id.isdigit():
        seq = await pg.fetchval(inbox.SEQ_OF, int(last_event_id), user_id)
        if seq is not None:
            return seq, True
    current = await pg.fetchval(inbox.CURRENT_SEQ, user_id)
    return current or 0, False


async def _events(
    conn: Connection,
    hub: Hub,
    db: asyncpg.Pool,
    start: tuple[int, bool],
    retry_ms: int,
) -> AsyncIterator[ServerSentEvent]:
    conn.last_seq, replay = start
    try:
        yield ServerSentEvent(retry=retry_ms, comment="connected")
        if replay:
            async for event in _replay(conn, db):
                yield event
        while True:
            kind, data = await conn.queue.get()
            if kind == "resync":
                async for event in _replay(conn, db):
                    yield event
            elif kind == "notification":
                if data["seq"] <= conn.last_seq:
                    continue
                conn.last_seq = data["seq"]
                hub.events_written += 1
                yield _notification(data)
            else:
                yield ServerSentEvent(
                    data=json.dumps(_public(data), ensure_ascii=False), event=kind
                )
    finally:
        hub.remove(conn)


async def _replay(conn: Connection, db: asyncpg.Pool) -> AsyncIterator[ServerSentEvent]:
    while True:
        async with connection(db) as pg:
            rows = await pg.fetch(
                inbox.REPLAY, conn.user_id, conn.last_seq, REPLAY_PAGE
            )
        for row in rows:
            conn.last_seq = row["inbox_seq"]
            yield _notification(inbox.event(row))
        if len(rows) < REPLAY_PAGE:
            return


def _notification(data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(
        data=json.dumps(data, ensure_ascii=False),
        event="notification",
        id=str(data["id"]),
    )


def _public(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k not in ("u", "kind")}


@router.get("/inbox")
async def list_inbox(
    user: User,
    db: Pool,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[int | None, Query(ge=1)] = None,
) -> dict[str, Any]:
    async with connection(db) as pg:
        rows = await pg.fetch(inbox.LIST, user.user_id, cursor, limit)
        unread = await pg.fetchval(inbox.UNREAD, user.user_id)
    items = [inbox.event(row) for row in rows]
    next_cursor = items[-1]["seq"] if len(items) == limit else None
    return {"items": items, "next_cursor": next_cursor, "unread": unread}


@router.get("/inbox/unread-count")
async def unread_count(user: User, db: Pool) -> dict[str, int]:
    async with connection(db) as pg:
        return {"unread": await pg.fetchval(inbox.UNREAD, user.user_id)}


async def _read_state_change(
    db: asyncpg.Pool, user_id: int, statement: str, *args: Any
) -> tuple[list[int], int]:
    async with transaction(db) as pg:
        # Serialise read-state changes per user, so the unread count announced with
        # each change is the count after it, in commit order.
        await pg.execute(
            "SELECT 1 FROM inbox_sequences WHERE user_id = $1 FOR UPDATE", user_id
        )
        ids = [r["id"] for r in await pg.fetch(statement, user_id, *args)]
        unread = await pg.fetchval(inbox.UNREAD, user_id)
        if ids:
            await inbox.announce(
                pg, {"kind": "read", "u": user_id, "ids": ids, "unread": unread}
            )
    return ids, unread


async def _require_own(db: asyncpg.Pool, user_id: int, notification_id: int) -> None:
    async with connection(db) as pg:
        if await pg.fetchval(inbox.OWNS, user_id, notification_id) is None:
            raise NotFound(f"notification {notification_id} is not in your inbox")


@router.post("/inbox/{notification_id}/read")
async def mark_read(notification_id: int, user: User, db: Pool) -> dict[str, Any]:
    await _require_own(db, user.user_id, notification_id)
    ids, unread = await _read_state_change(
        db, user.user_id, inbox.MARK_READ, [notification_id]
    )
    return {"marked": ids, "unread": unread}


@router.post("/inbox/read-all")
async def mark_all_read(user: User, db: Pool) -> dict[str, Any]:
    ids, unread = await _read_state_change(db, user.user_id, inbox.MARK_ALL_READ)
    return {"marked": ids, "unread": unread}


@router.post("/inbox/{notification_id}/archive")
async def archive(notification_id: int, user: User, db: Pool) -> dict[str, Any]:
    await _require_own(db, user.user_id, notification_id)
    ids, unread = await _read_state_change(
        db, user.user_id, inbox.ARCHIVE, notification_id
    )
    return {"archived": ids, "unread": unread}
