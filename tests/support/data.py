"""Test data written straight to PostgreSQL: users, posts, comments."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from comments.seed import seed


@dataclass(frozen=True)
class Demo:
    alice: int
    bob: int
    carol: int
    dave: int
    post: int


async def seed_demo(database_url: str) -> Demo:
    """The demo users and alice's post, as ``make run`` seeds them."""
    await seed(database_url)
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        ids = dict(await conn.fetch("SELECT username, id FROM users"))
        post = await conn.fetchval("SELECT min(id) FROM posts")
    finally:
        await conn.close()
    return Demo(ids["alice"], ids["bob"], ids["carol"], ids["dave"], post)
