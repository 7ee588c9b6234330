"""A task cancelled in the middle of a statement stays cancelled.

asyncpg answers a cancelled statement by asking the server, on a connection of its
own, to cancel it, and waits for that before the connection may go back to the
pool. When the server cannot be reached then, giving the connection back fails; the
task must still learn of its cancellation, or a loop that catches the database's
errors (a sweeper, a consumer) would run on, and the service's stop wait for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from contracts.db import connection, create_pool
from contracts.recovery import LeaseSweeper
from contracts.settings import Settings
from tests.integration.conftest import through
from tests.integration.proxy import Proxy
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def pool(settings: Settings, proxy: Proxy) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(
        settings.model_copy(update={"database_url": through(settings, proxy)}),
        min_size=1,
        max_size=2,
    )
    try:
        yield pool
    finally:
        pool.terminate()


async def _running(db: asyncpg.Connection, query: str) -> bool:
    # Each call in a transaction of its own: within one, pg_stat_activity is read
    # once and never changes.
    return bool(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND state = 'active' "
            "AND query LIKE $1 AND pid <> pg_backend_pid()",
            f"%{query}%",
        )
    )


async def test_a_cancelled_statement_stays_cancelled_when_the_server_is_out_of_reach(
    pool: asyncpg.Pool, proxy: Proxy, db: asyncpg.Connection
) -> None:
    async def query() -> None:
        async with connection(pool, timeout=0.5) as conn:
            await conn.execute("SELECT pg_sleep(30) /* long statement */")

    task = asyncio.create_task(query())
    await eventually(lambda: _running(db, "long statement"), what="statement running")
    # The cancellation asyncpg sends to the server goes no further than the proxy.
    proxy.stall()
    task.cancel()

    [outcome] = await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)

    assert isinstance(outcome, asyncio.CancelledError), repr(outcome)


async def test_a_sweeper_stopped_mid_sweep_stops_when_the_server_is_out_of_reach(
    pool: asyncpg.Pool, proxy: Proxy, db: asyncpg.Connection, settings: Settings
) -> None:
    locker = await asyncpg.connect(settings.database_url, timeout=10)
    sweeper = LeaseSweeper(
        pool,
        ["email"],
        interval=0.1,
        grace_seconds=60,
        max_attempts=3,
        pending_age_seconds=600,
    )
    try:
        async with locker.transaction():
            # The sweep waits on the lock, its statement running, when the stop
            # comes.
            await locker.execute("LOCK TABLE notifications IN ACCESS EXCLUSIVE MODE")
            sweeper.start()
            await eventually(
                lambda: _running(db, "notifications"),
                what="sweep waiting on the lock",
            )
            proxy.stall()

            stopped = await asyncio.wait_for(
                asyncio.gather(sweeper.stop(), return_exceptions=True), 20
            )
    finally:
        await locker.close()

    assert stopped == [None]
