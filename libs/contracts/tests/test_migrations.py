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
