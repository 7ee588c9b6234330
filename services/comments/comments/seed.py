"""``notiflow-seed``: demo users and a post by alice; idempotent."""

from __future__ import annotations

import argparse
import asyncio

import asyncpg

from contracts.preflight import require_services
from contracts.settings import get_settings, load_or_exit

USERS = [
    ("alice", "alice@example.com", "Alice Martin"),
    ("bob", "bob@example.com", "Bob Dupont"),
    ("carol", "carol@example.com", "Zoë 🚀 Carol"),
    ("dave", "dave@example.com", "Dave Ó Briain"),
]

POST_TITLE = "Welcome to notiflow"
POST_BODY = (
    "Comment here to see notifications arrive by email and live in the browser. "
    "Mention someone with @bob, @carol or @dave."
)


async def seed(database_url: str) -> None:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        async with conn.transaction():
            await conn.executemany(
                "INSERT INTO users (username, email, display_name) VALUES ($1, $2, $3) "
                "ON CONFLICT (username) DO NOTHING",
                USERS,
            )
            alice = await conn.fetchval("SELECT id FROM users WHERE username = 'alice'")
            has_post = await conn.fetchval(
                "SELECT 1 FROM posts WHERE author_id = $1 AND title = $2",
                alice,
                POST_TITLE,
            )
            if not has_post:
                await conn.execute(
                    "INSERT INTO posts (author_id, title, body) VALUES ($1, $2, $3)",
                    alice,
                    POST_TITLE,
                    POST_BODY,
                )
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(
        prog="notiflow-seed",
        description="Add the demo users alice, bob, carol and dave, and a post by "
        "alice, to the database NOTIFLOW_DATABASE_URL names; what is there already "
        "is kept.",
    ).parse_args(argv)
    settings = load_or_exit(get_settings)
    require_services(settings, broker=False, migrated=True)
    asyncio.run(seed(settings.database_url))
    print("seeded users alice, bob, carol, dave and a post by alice")
