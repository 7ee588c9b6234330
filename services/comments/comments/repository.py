"""SQL for users, posts and comments; every function runs on the caller's connection."""

from __future__ import annotations

import asyncpg

USER_FIELDS = (
    "u.id AS author_id, u.username AS author_username, "
    "u.display_name AS author_display_name"
)

LIST_USERS = "SELECT id, username, display_name FROM users ORDER BY id"

LIST_POSTS = f"""
SELECT p.id, p.title, p.body, p.created_at, {USER_FIELDS},
       (SELECT count(*) FROM comments c WHERE c.post_id = p.id) AS comment_count
FROM posts p JOIN users u ON u.id = p.author_id
ORDER BY p.id DESC
LIMIT $1
"""

GET_POST = f"""
SELECT p.id, p.title, p.body, p.created_at, {USER_FIELDS}
FROM posts p JOIN users u ON u.id = p.author_id
WHERE p.id = $1
"""

POST_COMMENTS = f"""
SELECT c.id, c.post_id, c.body, c.created_at, {USER_FIELDS}
FROM comments c JOIN users u ON u.id = c.author_id
WHERE c.post_id = $1
ORDER BY c.id
"""

# Comments on one post commit in the order of their ids. The dispatcher finds a
# thread's participants as the authors of the post's comments with smaller ids, so
# a comment that drew its id first and committed second would be missed: two people
# commenting on a thread for the first time at once would not hear of each other.
# Each writer therefore takes the post's transaction-scoped lock before the comment's
# id is drawn (the post CTE reads this one, and the insert reads the post), and holds
# it until its commit. Writers on one post wait for each other's commit, a fraction of
# a millisecond each; writers on different posts never wait for each other's lock,
# but for the rare two post ids whose keys share a hash. A writer waiting holds its
# pooled connection meanwhile, and no wait outlasts the statement timeout
# (NOTIFLOW_DB_COMMAND_TIMEOUT).
THREAD_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('post ' || $1::bigint, 0))"


def _paced(interval: str, wanted: str) -> str:
    """The CTE that takes one comment of the author's allowance (see migration
    0010_comment_pace), returning a row if it was there to take.

    ``interval`` is the parameter holding the seconds between comments once the
    allowance is spent (0 when comments are not limited), and ``wanted`` the
    condition for trying at all: the post and the author exist, and the request
    is not a replay. ON CONFLICT locks the author's row and judges by its latest
    committed value, past this statement's snapshot: a concurrent writer of the
    same author is waited for and counted.
    """
    return f"""paced AS (
    INSERT INTO comment_pace AS pace (user_id, paced_until)
    SELECT author.id, clock_timestamp() + make_interval(secs => {interval})
    FROM author, post
    WHERE {interval} > 0 AND {wanted}
    ON CONFLICT (user_id) DO UPDATE
    SET paced_until = greatest(pace.paced_until, clock_timestamp())
        + make_interval(secs => {interval})
    WHERE greatest(pace.paced_until, clock_timestamp())
        + make_interval(secs => {interval}) <= clock_timestamp() + interval '1 minute'
    RETURNING user_id
)"""


def _pace_columns(interval: str) -> str:
    """Whether the comment was within its author's allowance; to follow
    :func:`_paced`'s CTE."""
    return f"""{interval} <= 0 OR EXISTS (SELECT FROM paced) AS paced"""


# The whole seconds until a refused author's next comment would be taken ($2: the
# seconds between comments). Its own statement: the one that refused may have
# waited for another writer's row, and its snapshot would miss what that wrote.
PACE_WAIT = """
SELECT greatest(1, ceil(extract(epoch FROM paced_until + make_interval(secs => $2)
    - interval '1 minute' - clock_timestamp())))::int
FROM comment_pace WHERE user_id = $1
"""


_CLAIMED = "($4::text IS NULL OR EXISTS (SELECT FROM claim))"

# One round trip for what used to take three or four: claim the Idempotency-Key ($4,
# when there is one), look up the post and the author, and insert the comment only
# when the key was claimed and both exist. The row always comes back and says which
# step stopped the insert, in the order the API reports them: a missing author (the
# token names no user), then a key already claimed (replay), then a missing post.
#
# The thread's lock comes first (see THREAD_LOCK), then the key row: a concurrent
# request with the same key waits on the primary key until the first commits, then
# finds the stored response. The author's pace row (see _paced) comes last. Every
# writer takes the three in that order, so none waits for another that waits for
# it. A data-modifying CTE runs to completion whether or not the rest reads it, so
# the claim is taken even when the insert is skipped, and rolls back with the
# transaction if the API refuses.
CREATE_COMMENT = f"""
WITH locked AS (
    {THREAD_LOCK}
), claim AS (
    INSERT INTO idempotency_keys (user_id, key, request_hash, status_code, response)
    SELECT $2, $4, $5, 0, 'null' FROM locked WHERE $4::text IS NOT NULL
    ON CONFLICT (user_id, key) DO NOTHING
    RETURNING key
), post AS (
    SELECT id FROM posts, locked WHERE id = $1
), author AS (
    SELECT id, username, display_name FROM users WHERE id = $2
), {_paced("$6::float8", _CLAIMED)}, inserted AS (
    INSERT INTO comments (post_id, author_id, body)
    SELECT post.id, author.id, $3 FROM post, author
    WHERE {_CLAIMED} AND ($6 <= 0 OR EXISTS (SELECT FROM paced))
    RETURNING id, created_at
)
SELECT {_CLAIMED} AS claimed,
       EXISTS (SELECT FROM post) AS post_exists,
       author.id AS author_id, author.username AS author_username,
       author.display_name AS author_display_name,
       {_pace_columns("$6::float8")},
       inserted.id, inserted.created_at
FROM (VALUES (1)) AS one (n)
LEFT JOIN author ON true
LEFT JOIN inserted ON true
"""

# Without an Idempotency-Key, everything is one statement, so one transaction and one
# round trip: look up the post and the author, insert the comment, and write its
# CommentCreated into the outbox, built here because only the insert knows the
# comment's id. $8 is 'on' when the process's relay takes the outbox row by hand-off
# (see contracts.outbox), which keeps the table's trigger from notifying the others.
# Nothing is written when the post or the author is missing, or when the author
# has no comment left this minute (see _paced). The thread's lock (THREAD_LOCK) is
# taken before the comment's id is drawn, and before the author's pace row.
CREATE_COMMENT_AND_EVENT = f"""
WITH handed AS (
    SELECT set_config('notiflow.outbox_handoff', $8, true)
), locked AS (
    {THREAD_LOCK}
), post AS (
    SELECT id FROM posts, locked WHERE id = $1
), author AS (
    SELECT id, username, display_name FROM users WHERE id = $2
), {_paced("$11::float8", "true")}, inserted AS (
    INSERT INTO comments (post_id, author_id, body)
    SELECT post.id, author.id, $3 FROM post, author
    WHERE $11 <= 0 OR EXISTS (SELECT FROM paced)
    RETURNING id, created_at
), queued AS (
    INSERT INTO outbox (exchange, routing_key, message_id, headers, body)
    SELECT $4, $5, $6::text, $7::jsonb,
        convert_to(json_build_object(
            'schema_version', $9::text,
            'event_id', $6::text,
            'occurred_at', $10::text,
            'comment_id', inserted.id,
            'post_id', $1::bigint,
            'author_id', $2::bigint,
            'body', $3::text
        )::text, 'UTF8')
    FROM inserted, handed
    RETURNING *
)
SELECT EXISTS (SELECT FROM post) AS post_exists,
       author.id AS author_id, author.username AS author_username,
       author.display_name AS author_display_name,
       {_pace_columns("$11::float8")},
       inserted.id, inserted.created_at,
       queued.id AS outbox_id, queued.exchange, queued.routing_key,
       queued.message_id, queued.headers, queued.body AS message_body,
       queued.priority, queued.created_at AS queued_at
FROM (VALUES (1)) AS one (n)
LEFT JOIN author ON true
LEFT JOIN inserted ON true
LEFT JOIN queued ON true
"""

STORED_RESPONSE = """
SELECT request_hash, status_code, response FROM idempotency_keys
WHERE user_id = $1 AND key = $2
"""

STORE_RESPONSE = """
UPDATE idempotency_keys SET status_code = $3, response = $4
WHERE user_id = $1 AND key = $2
"""


def outbox_row(row: asyncpg.Record) -> dict[str, object]:
    """The outbox row :data:`CREATE_COMMENT_AND_EVENT` wrote, as the relay takes it."""
    return {
        "id": row["outbox_id"],
        "exchange": row["exchange"],
        "routing_key": row["routing_key"],
        "message_id": row["message_id"],
        "headers": row["headers"],
        "body": row["message_body"],
        "priority": row["priority"],
        "created_at": row["queued_at"],
    }


def person(row: asyncpg.Record) -> dict[str, object]:
    return {
        "id": row["author_id"],
        "username": row["author_username"],
        "display_name": row["author_display_name"],
    }


def post(row: asyncpg.Record) -> dict[str, object]:
    return {
        "id": row["id"],
        "title": row["title"],
        "body": row["body"],
        "author": person(row),
        "created_at": row["created_at"].isoformat(),
    }


def comment(row: asyncpg.Record) -> dict[str, object]:
    return {
        "id": row["id"],
        "post_id": row["post_id"],
        "body": row["body"],
        "author": person(row),
        "created_at": row["created_at"].isoformat(),
    }
