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


async def forget_old_keys(pool: asyncpg.Pool, hours: int, batch: int = BATCH) -> int:
    """Delete the keys stored more than ``hours`` ago; how many there were."""
    forgotten = 0
    while True:
        async with connection(pool) as pg:
            status = await pg.execute(FORGET, hours, batch)
        deleted = int(status.split()[-1])
        forgotten += deleted
        if deleted < batch:
            return forgotten


class KeySweeper:
    """Runs :func:`forget_old_keys` at start and every ``interval`` seconds."""

    def __init__(
        self, pool: asyncpg.Pool, hours: int, interval: float | None = None
    ) -> None:
        self._pool = pool
        self._hours = hours
        self._interval = interval or SWEEP_SECONDS
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="idempotency-key-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task, "the idempotency key sweeper")

    async def _run(self) -> None:
        while True:
            try:
                forgotten = await forget_old_keys(self._pool, self._hours)
            except Exception as exc:
                # The database away, a statement refused: the next sweep will
                # find the same keys, and more.
                logger.warning(
                    "could not forget old idempotency keys: %s; trying again in %g s",
                    exc,
                    self._interval,
                    extra={"action": "idempotency.sweep_failed"},
                )
            else:
                if forgotten:
                    logger.info(
                        "forgot %d idempotency keys older than %d hours",
                        forgotten,
                        self._hours,
                        extra={
                            "action": "idempotency.keys_forgotten",
                            "count": forgotten,
                        },
                    )
            await asyncio.sleep(self._interval)
