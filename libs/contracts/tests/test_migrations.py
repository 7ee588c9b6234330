"""Migrations apply to an empty database, roll back completely, and apply again."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from contracts import migrate
from tests.support import infra

pytestmark = pytest.mark.integration


@pytest.fixture
async def empty_database() -> AsyncIterator[str]:
    name = infra.unique("notiflow_mig")
    try:
        yield infra.database_url(name)
    finally:
        await infra.drop_database(name)


async def tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename NOT LIKE '\\_yoyo%' AND tablename NOT LIKE 'yoyo%'"
        )
    finally:
        await conn.close()
    return {r["tablename"] for r in rows}


async def test_migrations_apply_roll_back_and_apply_again(empty_database: str) -> None:
    applied = migrate.apply(empty_database)
    first = await tables(empty_database)

    assert applied >= 1
    assert {"users", "posts", "comments", "outbox", "notifications"} <= first
    assert migrate.apply(empty_database) == 0, "a second run applies nothing"

    assert migrate.rollback_all(empty_database) == applied
    assert await tables(empty_database) == set()

    assert migrate.apply(empty_database) == applied
    assert await tables(empty_database) == first


ADD_DELIVERED = """
WITH event AS (
    INSERT INTO events (id, type, payload, occurred_at)
    VALUES (gen_random_uuid(), 'comment.created', '{}', now())
    RETURNING id
)
INSERT INTO notifications (
    event_id, user_id, title, message, type, channel, event_occurred_at,
    inbox_seq, read_at, archived_at, status
)
SELECT event.id, $1, 't', 'm', 'sse', 'comment.reply', now(), $2::bigint,
       CASE WHEN $3 THEN now() END, CASE WHEN $4 THEN now() END, 'sent'
FROM event
"""


async def test_the_unread_count_column_starts_from_the_rows_already_delivered(
    empty_database: str,
) -> None:
    infra.migrate_before(empty_database, "0004")

    conn = await asyncpg.connect(empty_database)
    try:
        user = await conn.fetchval(
            "INSERT INTO users (username, email, display_name) "
            "VALUES ('u', 'u@example.com', 'U') RETURNING id"
        )
        # Delivered: two unread, one read, one archived; and one not delivered yet.
        rows = [
            (1, False, False),
            (2, True, False),
            (3, False, True),
            (4, False, False),
            (None, False, False),
        ]
        for seq, read, archived in rows:
            await conn.execute(ADD_DELIVERED, user, seq, read, archived)
        await conn.execute(
            "INSERT INTO inbox_sequences (user_id, last_seq) VALUES ($1, 4)", user
        )
    finally:
        await conn.close()

    migrate.apply(empty_database)

    conn = await asyncpg.connect(empty_database)
    try:
        unread = await conn.fetchval(
            "SELECT unread FROM inbox_sequences WHERE user_id = $1", user
        )
    finally:
        await conn.close()
    assert unread == 2


async def test_events_stored_before_comments_were_recorded_name_their_comment(
    empty_database: str,
) -> None:
    infra.migrate_before(empty_database, "0008")
    conn = await asyncpg.connect(empty_database)
    try:
        # Comment 7 had two events (edited and published again by hand), comment
        # 8 one; an event naming no comment, and one of another type, are left.
        for comment, seconds in [(7, 2), (7, 1), (8, 1), (None, 1)]:
            payload = "{}" if comment is None else f'{{"comment_id": {comment}}}'
            await conn.execute(
                "INSERT INTO events (id, type, payload, occurred_at, received_at) "
                "VALUES (gen_random_uuid(), 'comment.created', $1::jsonb, now(), "
                "now() - make_interval(secs => $2))",
                payload,
                seconds,
            )
        await conn.execute(
            "INSERT INTO events (id, type, payload, occurred_at) VALUES "
            "(gen_random_uuid(), 'other', '{\"comment_id\": 9}', now())"
        )
    finally:
        await conn.close()

    migrate.apply(empty_database)

    conn = await asyncpg.connect(empty_database)
    try:
        rows = await conn.fetch(
            "SELECT payload->>'comment_id' AS named, comment_id, type FROM events "
            "ORDER BY type, named NULLS LAST, received_at"
        )
    finally:
        await conn.close()
    assert [(r["named"], r["comment_id"], r["type"]) for r in rows] == [
        ("7", 7, "comment.created"),  # the earliest of comment 7's two events
        ("7", None, "comment.created"),
        ("8", 8, "comment.created"),
        (None, None, "comment.created"),
        ("9", None, "other"),
    ]


# Each migration that builds an index CONCURRENTLY, outside a transaction: what a
# build cut short leaves behind, before the migration is recorded.
INTERRUPTED = [
    (
        "0005_pending_republish",
        [
            "ALTER TABLE notifications ADD COLUMN republished_at timestamptz",
            "CREATE INDEX notifications_pending_idx ON notifications (type) "
            "WHERE status = 'pending'",
        ],
        "notifications_pending_idx",
    ),
    (
        "0007_idempotency_key_age",
        ["CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at)"],
        "idempotency_keys_created_idx",
    ),
    (
        "0008_events_by_comment",
        [
            "ALTER TABLE events ADD COLUMN comment_id bigint",
            "CREATE UNIQUE INDEX events_comment_id_key ON events (comment_id)",
        ],
        "events_comment_id_key",
    ),
]


@pytest.mark.parametrize("valid", [False, True], ids=["invalid", "complete"])
@pytest.mark.parametrize(("migration", "leftovers", "index"), INTERRUPTED)
async def test_a_concurrent_index_build_cut_short_can_be_applied_again(
    empty_database: str,
    migration: str,
    leftovers: list[str],
    index: str,
    valid: bool,
) -> None:
    infra.migrate_before(empty_database, migration)
    conn = await asyncpg.connect(empty_database)
    try:
        for statement in leftovers:
            await conn.execute(statement)
        # A lost connection leaves the index marked invalid; a run killed while
        # the server builds on leaves it complete. Either way, unrecorded.
        await conn.execute(
            "UPDATE pg_index SET indisvalid = $1 WHERE indexrelid = $2::regclass",
            valid,
            index,
        )

        migrate.apply(empty_database)

        built = await conn.fetchrow(
            "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) AS definition "
            "FROM pg_index i WHERE i.indexrelid = $1::regclass",
            index,
        )
        recorded = await conn.fetchval(
            "SELECT count(*) FROM _yoyo_migration WHERE migration_id = $1", migration
        )
    finally:
        await conn.close()
    assert built["indisvalid"]
    assert recorded == 1
    # Built anew as the migration says, not kept as it was left.
    if migration.startswith("0005"):
        assert "GREATEST(updated_at, republished_at)" in built["definition"]
