"""Forgetting Idempotency-Keys once no client would retry with them.

A request with an ``Idempotency-Key`` stores the key with its response, so that a
retry gets the same answer. Kept for ever, those rows would grow with every
comment posted. :class:`KeySweeper` deletes the keys older than
``NOTIFLOW_IDEMPOTENCY_KEY_HOURS``, oldest first and a batch per statement, every
:data:`SWEEP_SECONDS`; after that a retry with the same key is a new request. Every
replica of the service sweeps, and each skips the rows another is deleting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import asyncpg

from contracts.db import connection
from contracts.tasks import stop_task

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 300.0
BATCH = 1000

FORGET = """
DELETE FROM idempotency_keys
WHERE (user_id, key) IN (
    SELECT user_id, key FROM idempotency_keys
    WHERE created_at < now() - make_interval(hours => $1)
    ORDER BY created_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
"""


async def forget_batches(
    pool: asyncpg.Pool, hours: int, batch: int = BATCH
) -> AsyncIterator[int]:
    """Delete the keys stored more than ``hours`` ago, a batch per statement,
    yielding how many each statement deleted."""
    while True:
        async with connection(pool) as pg:
            status = await pg.execute(FORGET, hours, batch)
        deleted = int(status.split()[-1])
        yield deleted
        if deleted < batch:
            return


async def forget_old_keys(pool: asyncpg.Pool, hours: int, batch: int = BATCH) -> int:
    """Delete the keys stored more than ``hours`` ago; how many there were."""
    return sum([deleted async for deleted in forget_batches(pool, hours, batch)])


class KeySweeper:
    """Forgets old keys at start and every ``interval`` seconds."""

    def __init__(
        self, pool: asyncpg.Pool, hours: int, interval: float | None = None
    ) -> None:
        self._pool = pool
        self._hours = hours
        self._interval = interval or SWEEP_SECONDS
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="idempotency-key-sweeper")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await stop_task(self._task, "the idempotency key sweeper")

    async def _run(self) -> None:
        while not self._stopping:
            await self._sweep()
            await asyncio.sleep(self._interval)

    async def _sweep(self) -> None:
        # Each statement commits on its own, so a sweep cut short has still
        # forgotten what it deleted before; the log says how many.
        forgotten = 0
        try:
            async for deleted in forget_batches(self._pool, self._hours):
                forgotten += deleted
        except asyncio.CancelledError:
            self._log_stopped(forgotten)
            raise
        except Exception as exc:
            if self._stopping:
                # A cancelled statement can surface as the driver's own error.
                self._log_stopped(forgotten)
                return
            # The database away, a statement refused: the next sweep will
            # find the same keys, and more.
            logger.warning(
                "could not forget old idempotency keys%s: %s; trying again in %g s",
                f" after forgetting {forgotten}" if forgotten else "",
                exc,
                self._interval,
                extra={"action": "idempotency.sweep_failed", "count": forgotten},
            )
        else:
            if forgotten:
                logger.info(
                    "forgot %d idempotency keys older than %d hours",
                    forgotten,
                    self._hours,
                    extra={"action": "idempotency.keys_forgotten", "count": forgotten},
                )

    def _log_stopped(self, forgotten: int) -> None:
        if forgotten:
            logger.info(
                "stopped forgetting idempotency keys older than %d hours after "
                "forgetting %d; the next sweep goes on",
                self._hours,
                forgotten,
                extra={"action": "idempotency.sweep_stopped", "count": forgotten},
            )
