"""The pool every service uses, against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

from contracts.db import DatabaseUnavailable, connection, create_pool, transaction
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


@pytest.mark.parametrize("block", [connection, transaction])
async def test_a_connection_the_server_terminated_reads_as_the_database_away(
    settings: Settings, block: object
) -> None:
    pool = await create_pool(settings, min_size=1, max_size=1)
    errors: list[BaseException] = []
    try:
        for _ in range(3):
            try:
                async with block(pool) as conn:  # type: ignore[operator]
                    # What a failover or a restart of PostgreSQL does to every
                    # connection, done here to this one only, mid-statement.
                    running = asyncio.create_task(conn.fetchval("SELECT pg_sleep(5)"))
                    await asyncio.sleep(0.3)
                    await pool_admin(settings, conn.get_server_pid())
                    await running
            except Exception as exc:
                errors.append(exc)
    finally:
        await pool.close()

    assert [type(e) for e in errors] == [DatabaseUnavailable] * len(errors)
    assert errors, "the terminated connection was used without an error"


async def pool_admin(settings: Settings, pid: int) -> None:
    admin = await asyncpg.connect(settings.database_url)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def test_any_error_from_a_connection_the_server_closed_is_the_database_away(
    settings: Settings,
) -> None:
    pool = await create_pool(settings, min_size=1, max_size=1)
    try:
        with pytest.raises(DatabaseUnavailable):
            async with connection(pool) as conn:
                await pool_admin(settings, conn.get_server_pid())
                with contextlib.suppress(Exception):
                    await conn.fetchval("SELECT 1")
                # What asyncpg raised in services whose connections PostgreSQL
                # ended mid-batch.
                raise asyncpg.InternalClientError(
                    "cannot switch to state 12; another operation (2) is in progress"
                )
    finally:
        await pool.close()


async def test_an_error_on_a_live_connection_is_still_the_callers(
    settings: Settings,
) -> None:
    pool = await create_pool(settings, min_size=1, max_size=1)
    try:
        with pytest.raises(asyncpg.UndefinedTableError):
            async with connection(pool) as conn:
                await conn.fetchval("SELECT * FROM no_such_table")
    finally:
        await pool.close()
