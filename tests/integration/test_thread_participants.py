"""A thread's participants when first comments on it are written at the same moment.

The dispatcher takes a thread's participants to be the authors of the post's
comments with smaller ids. Here one comment draws its id and is held before its
commit while a second is written and dispatched at once, as the outbox would: the
second must wait for the first, and then name its author as a participant.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from comments import repository as comments_sql
from contracts import topology
from contracts.db import create_pool
from contracts.messages import CommentCreated
from contracts.settings import Settings
from dispatcher import channels, templates
from dispatcher.service import Dispatcher
from tests.support.data import Demo

pytestmark = pytest.mark.integration

VERSION = f"{CommentCreated.MAJOR}.{CommentCreated.MINOR}"


def _dispatcher() -> Dispatcher:
    return Dispatcher(
        channels.ChannelConfigs(channels.DEFAULT_PATH, templates.Renderer().problem),
        templates.Renderer(templates.DEFAULT_DIR),
        "http://127.0.0.1:8081",
        secret_key="participants-" + "p" * 32,
    )


# Seconds between one author's comments once the minute's are spent: the
# default limit's, so that the author's pace row is taken as the API takes it.
PACE = 60 / 30


async def _write(
    conn: asyncpg.Connection, post: int, author: int, body: str, key: str | None
) -> CommentCreated:
    """Write a comment with the statement the comments API uses for ``key``."""
    event_id = uuid.uuid4()
    if key is None:
        row = await conn.fetchrow(
            comments_sql.CREATE_COMMENT_AND_EVENT,
            post,
            author,
            body,
            topology.EVENTS_EXCHANGE,
            topology.COMMENT_CREATED,
            str(event_id),
            {"event_id": str(event_id)},
            "off",
            VERSION,
            datetime.now(UTC).isoformat(),
            PACE,
        )
    else:
        row = await conn.fetchrow(
            comments_sql.CREATE_COMMENT, post, author, body, key, "hash-" + key, PACE
        )
    assert row["id"] is not None, dict(row)
    return CommentCreated(
        event_id=event_id,
        occurred_at=datetime.now(UTC),
        comment_id=row["id"],
        post_id=post,
        author_id=author,
        body=body,
    )


@contextlib.asynccontextmanager
async def _two_connections(
    settings: Settings,
) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection]]:
    """Two connections set up as the services' are (JSON codecs)."""
    pool = await create_pool(settings, min_size=2, max_size=2)
    async with pool, pool.acquire() as first, pool.acquire() as second:
        yield first, second


async def _waits_for_a_lock(observer: asyncpg.Connection, pid: int) -> bool:
    return bool(
        await observer.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
            pid,
        )
    )


@pytest.mark.parametrize("key", [None, "first-comments"], ids=["plain", "with-key"])
async def test_a_first_comment_committed_late_still_makes_its_author_a_participant(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    key: str | None,
) -> None:
    dispatcher = _dispatcher()
    async with _two_connections(settings) as (early, late):
        held = early.transaction()
        await held.start()
        # bob's comment draws its id, and its commit is held back.
        await _write(early, demo.post, demo.bob, "bob, first here", key)

        async def carol_comments_and_is_dispatched() -> uuid.UUID:
            event = await _write(late, demo.post, demo.carol, "carol, first too", key)
            # The outbox publishes the event once it is committed; dispatch it now.
            await dispatcher.handle(late, event)
            return event.event_id

        carol = asyncio.create_task(carol_comments_and_is_dispatched())
        for _ in range(200):
            if carol.done() or await _waits_for_a_lock(db, late.get_server_pid()):
                break
            await asyncio.sleep(0.025)
        await held.commit()
        event_id = await asyncio.wait_for(carol, 10)

    heard = await db.fetch(
        "SELECT user_id FROM notifications WHERE event_id = $1 AND type = 'sse'",
        event_id,
    )
    assert {row["user_id"] for row in heard} == {demo.alice, demo.bob}
    ids = await db.fetch(
        "SELECT author_id FROM comments WHERE post_id = $1 ORDER BY id", demo.post
    )
    assert [row["author_id"] for row in ids] == [demo.bob, demo.carol]


async def test_comments_on_different_posts_do_not_wait_for_each_other(
    settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    other_post = await db.fetchval(
        "INSERT INTO posts (author_id, title, body) "
        "VALUES ($1, 'Another', 'by dave') RETURNING id",
        demo.dave,
    )
    async with _two_connections(settings) as (early, late):
        held = early.transaction()
        await held.start()
        await _write(early, demo.post, demo.bob, "held back", None)
        # Would wait for the held transaction if the two shared a lock.
        event = await asyncio.wait_for(
            _write(late, other_post, demo.carol, "elsewhere", None), 10
        )
        await held.rollback()

    stored = await db.fetch("SELECT id, post_id FROM comments ORDER BY id")
    assert [(row["id"], row["post_id"]) for row in stored] == [
        (event.comment_id, other_post)
    ]
