"""The pool every service uses, against the real PostgreSQL."""

from __future__ import annotations

import pytest

from contracts.db import create_pool
from contracts.settings import Settings

pytestmark = pytest.mark.integration


async def test_a_transaction_left_open_is_rolled_back_when_the_connection_returns(
    settings: Settings,
) -> None:
    pool = await create_pool(settings, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("CREATE TABLE scratch (n int)")
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO scratch VALUES (1)")
        # The pool holds one connection: this is the same one, back from release.
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM scratch") == 0
    finally:
        await pool.close()


async def test_json_columns_read_and_write_python_values(settings: Settings) -> None:
    pool = await create_pool(settings, min_size=1, max_size=1)
    try:
        value = await pool.fetchval("SELECT $1::jsonb", {"a": [1, "ü"]})
    finally:
        await pool.close()
    assert value == {"a": [1, "ü"]}
