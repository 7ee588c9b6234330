"""A task cancelled in the middle of a statement stays cancelled.

asyncpg answers a cancelled statement by asking the server, on a connection of its
own, to cancel it, and waits for that before the connection may go back to the
pool. When the server cannot be reached then, giving the connection back fails; the
task must still learn of its cancellation, or a loop that catches the database's
errors (a sweeper, a consumer) would run on, and the service's stop wait for ever.
"""

from __future__ import annotations

import asyncio
import logging
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


async def test_a_sweep_cancelled_by_an_operator_leaves_the_sweeper_sweeping(
    db: asyncpg.Connection, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="contracts.recovery")
    pool = await create_pool(settings, min_size=1, max_size=2)
    locker = await asyncpg.connect(settings.database_url, timeout=10)
    sweeper = LeaseSweeper(
        pool,
        ["email"],
        interval=0.1,
        grace_seconds=60,
        max_attempts=3,
        pending_age_seconds=600,
    )
    sweeps: list[bool] = []
    sweep = sweeper.sweep

    async def counted():  # type: ignore[no-untyped-def]
        try:
            return await sweep()
        finally:
            sweeps.append(True)

    sweeper.sweep = counted  # type: ignore[method-assign]
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE notifications IN ACCESS EXCLUSIVE MODE")
            sweeper.start()
            await eventually(
                lambda: _running(db, "notifications"), what="sweep waiting on the lock"
            )
            # As an operator would, with pg_cancel_backend: QueryCanceledError.
            await db.execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND state = 'active' "
                "AND query LIKE '%notifications%' AND pid <> pg_backend_pid()"
            )
            await eventually(lambda: _count(sweeps, 1), what="the sweep cancelled")
        await eventually(lambda: _count(sweeps, 3), what="two sweeps after it")
        assert sweeper._task is not None and not sweeper._task.done()
        # A refusal that passes, said in one line: no traceback, as for a bug.
        (skipped,) = [
            r
            for r in caplog.records
            if getattr(r, "action", None) == "delivery.sweep_failed"
        ]
        assert skipped.levelno == logging.WARNING and skipped.exc_info is None
        assert "QueryCanceledError" in skipped.getMessage()
    finally:
        await sweeper.stop()
        await locker.close()
        await pool.close()


async def _count(items: list[bool], at_least: int) -> bool:
    await asyncio.sleep(0)
    return len(items) >= at_least
