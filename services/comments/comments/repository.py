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

POST_EXISTS = "SELECT 1 FROM posts WHERE id = $1"

INSERT_COMMENT = """
INSERT INTO comments (post_id, author_id, body) VALUES ($1, $2, $3)
RETURNING id, created_at
"""

GET_USER = "SELECT id, username, display_name FROM users WHERE id = $1"

# The key row is inserted first: a concurrent request with the same key waits on the
# primary key until the first commits, then finds the stored response.
CLAIM_IDEMPOTENCY_KEY = """
INSERT INTO idempotency_keys (user_id, key, request_hash, status_code, response)
VALUES ($1, $2, $3, 0, 'null')
ON CONFLICT (user_id, key) DO NOTHING
RETURNING key
"""

STORED_RESPONSE = """
SELECT request_hash, status_code, response FROM idempotency_keys
WHERE user_id = $1 AND key = $2
"""

STORE_RESPONSE = """
UPDATE idempotency_keys SET status_code = $3, response = $4
WHERE user_id = $1 AND key = $2
"""


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
