"""Putting deliveries back on the road from what the notification rows say.

The rows are the truth; a message is only a reminder to look at one. Two kinds of
row can be left without a reminder:

* ``sending`` with ``lease_expires_at`` in the past: the worker that claimed it died
  (SIGKILL, OOM, a lost node) before it recorded an outcome. RabbitMQ redelivers the
  unacked message, but a claim that meets a live lease acks it as a duplicate, and
  once the lease runs out nobody is left to try.
* ``retrying`` whose ``next_attempt_at`` passed more than a lease ago: its message in
  a delay queue is gone (the retry queues are classic and not replicated).
* ``pending`` for longer than ``NOTIFLOW_PENDING_REPUBLISH_SECONDS``: its message may
  have been lost with a delivery queue (also classic: a node lost, a queue deleted
  and declared again, a purge), or may still be waiting behind a long backlog. The
  rows cannot tell which.

:class:`LeaseSweeper` finds them with ``FOR UPDATE SKIP LOCKED`` and enqueues a fresh
:class:`~contracts.messages.DeliveryRequested` for each through the outbox in the same
transaction. It moves a lost ``sending`` row to ``retrying`` (the claim accepts that
state, and it is the state the row would have reached had its worker lived to see
the failure); a row that has used up its attempts this way is marked ``failed``
instead, so a message that kills its worker every time stops after a few rounds. A
``pending`` row stays ``pending``, and its ``republished_at`` records the new
message: the row is published again at most once per period, so a backlog that
waits longer than that gains one duplicate message per row and period, not one per
sweep. A duplicate costs a claim that finds nothing to do: ``pending → sending``
lets one worker through, and the others ack their copy. Several sweepers may run
side by side; the row locks keep them apart.

:func:`requeue_failed` is the operator's way back from ``failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple
from uuid import UUID

import asyncpg

from contracts import metrics, topology
from contracts.db import is_unavailable, transaction
from contracts.messages import DeliveryRequested
from contracts.outbox import Outgoing, enqueue
from contracts.settings import Settings
from contracts.tasks import stop_task

logger = logging.getLogger(__name__)

_COLUMNS = (
    "n.id, n.event_id, n.user_id, n.type, n.channel, n.priority, n.event_occurred_at"
)

RECOVER = f"""
WITH lost AS (
    SELECT id FROM notifications
    WHERE type = ANY($1::text[])
      AND ((status = 'sending' AND lease_expires_at < now())
           OR (status = 'retrying'
               AND next_attempt_at < now() - make_interval(secs => $2)))
    ORDER BY id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
)
UPDATE notifications n
SET status = CASE WHEN n.attempts >= $3 THEN 'failed' ELSE 'retrying' END,
    last_error = CASE
        WHEN n.status = 'retrying' THEN n.last_error
        WHEN n.attempts >= $3 THEN
            'worker lost during attempt ' || n.attempts || '; no attempts left'
        ELSE 'worker lost during attempt ' || n.attempts
    END,
    next_attempt_at = CASE WHEN n.attempts >= $3 THEN NULL ELSE now() END,
    lease_expires_at = NULL,
    updated_at = now()
FROM lost
WHERE n.id = lost.id
RETURNING {_COLUMNS}, n.status
"""

# How long a row has been pending counts from when it became pending (its insert,
# or an operator's requeue, which both set updated_at) or from its last republish,
# whichever is later; notifications_pending_idx (migration 0005) holds that time.
REPUBLISH = f"""
WITH waiting AS (
    SELECT id FROM notifications
    WHERE status = 'pending'
      AND type = ANY($1::text[])
      AND greatest(updated_at, republished_at) < now() - make_interval(secs => $2)
    ORDER BY id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE notifications n
SET republished_at = now()
FROM waiting
WHERE n.id = waiting.id
RETURNING {_COLUMNS},
    extract(epoch FROM now() - n.updated_at)::float8 AS pending_seconds
"""

REQUEUE_FAILED = f"""
WITH chosen AS (
    SELECT id FROM notifications
    WHERE status = 'failed'
      AND ($1::uuid IS NULL OR event_id = $1)
      AND ($2::timestamptz IS NULL OR updated_at >= $2)
      AND ($3::timestamptz IS NULL OR updated_at < $3)
    ORDER BY id
    FOR UPDATE SKIP LOCKED
)
UPDATE notifications n
SET status = 'pending', attempts = 0, next_attempt_at = NULL,
    lease_expires_at = NULL, updated_at = now(),
    -- The address the user has now: a failure is often an address since
    -- corrected, and the copy taken at dispatch would fail again.
    email = CASE WHEN n.type = 'email' THEN u.email ELSE n.email END
FROM chosen, users u
WHERE n.id = chosen.id AND u.id = n.user_id
RETURNING {_COLUMNS}
"""


def delivery(row: asyncpg.Record) -> Outgoing:
    """The outbox entry asking ``row``'s channel sender to deliver it."""
    return Outgoing(
        exchange=topology.DELIVERIES_EXCHANGE,
        routing_key=row["type"],
        message_id=f"notification-{row['id']}",
        priority=row["priority"],
        headers={"event_id": str(row["event_id"]), "notification_id": row["id"]},
        message=DeliveryRequested(
            notification_id=row["id"],
            event_id=row["event_id"],
            user_id=row["user_id"],
            type=row["type"],
            channel=row["channel"],
            priority=row["priority"],
            event_occurred_at=row["event_occurred_at"],
        ),
    )


async def recover(
    conn: asyncpg.Connection,
    types: Sequence[str],
    *,
    grace_seconds: float,
    max_attempts: int,
    limit: int = 500,
) -> tuple[int, int]:
    """One sweep in the caller's transaction; returns (re-enqueued, failed)."""
    rows = await conn.fetch(RECOVER, list(types), grace_seconds, max_attempts, limit)
    again = [row for row in rows if row["status"] == "retrying"]
    await enqueue(conn, [delivery(row) for row in again])
    return len(again), len(rows) - len(again)


async def republish_pending(
    conn: asyncpg.Connection,
    types: Sequence[str],
    *,
    age_seconds: float,
    limit: int = 500,
) -> list[asyncpg.Record]:
    """Enqueue a fresh delivery for each row of ``types`` pending too long.

    "Too long" is ``age_seconds`` since the row became pending and since it was last
    published again. Run it in a transaction: the rows' ``republished_at`` and their
    messages commit together or not at all. Returns the rows, each with the seconds
    it has been pending as ``pending_seconds``.
    """
    rows = await conn.fetch(REPUBLISH, list(types), age_seconds, limit)
    await enqueue(conn, [delivery(row) for row in rows])
    return rows


async def requeue_failed(
    conn: asyncpg.Connection,
    *,
    event_id: UUID | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[int]:
    """Set the chosen ``failed`` rows back to ``pending`` and enqueue each again.

    Rows are chosen by event, or by when they failed (``updated_at``). An email row
    takes the user's address as it is now. Run it in a transaction: the rows and
    their messages commit together or not at all.
    """
    rows = await conn.fetch(REQUEUE_FAILED, event_id, since, until)
    await enqueue(conn, [delivery(row) for row in rows])
    return [row["id"] for row in rows]


class Swept(NamedTuple):
    """What one sweep did: rows re-enqueued after a lost worker or retry message,
    rows failed for want of attempts, pending rows published again."""

    recovered: int
    failed: int
    republished: int


class LeaseSweeper:
    """Runs :func:`recover` and :func:`republish_pending` every ``interval`` seconds
    until stopped. ``pending_age_seconds`` is the service's
    ``pending_republish_seconds`` setting."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        types: Sequence[str],
        *,
        interval: float,
        grace_seconds: float,
        max_attempts: int,
        pending_age_seconds: float,
    ) -> None:
        self._pool = pool
        self._types = tuple(types)
        self._interval = interval
        self._grace = grace_seconds
        self._max_attempts = max_attempts
        self._pending_age = pending_age_seconds
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.recovered = 0
        self.republished = 0

    @classmethod
    def of_sender(
        cls,
        pool: asyncpg.Pool,
        settings: Settings,
        channel_type: str,
        *,
        interval: float,
        grace_seconds: float,
    ) -> LeaseSweeper:
        """The sweeper of the sender of ``channel_type``: a row gets one attempt
        more than there are retry delays, and a row left ``pending`` is published
        again after ``settings.pending_republish_seconds``."""
        return cls(
            pool,
            [channel_type],
            interval=interval,
            grace_seconds=grace_seconds,
            max_attempts=len(settings.retry_delay_levels) + 1,
            pending_age_seconds=settings.pending_republish_seconds,
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lease-sweeper")

    def started_in(self, parts: contextlib.AsyncExitStack) -> LeaseSweeper:
        """Start sweeping, to be stopped when ``parts`` closes."""
        self.start()
        parts.push_async_callback(self.stop)
        return self

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await stop_task(self._task, "the lease sweeper")

    async def sweep(self) -> Swept:
        async with transaction(self._pool) as conn:
            again, failed = await recover(
                conn,
                self._types,
                grace_seconds=self._grace,
                max_attempts=self._max_attempts,
            )
            waiting = await republish_pending(
                conn, self._types, age_seconds=self._pending_age
            )
        metrics.RECOVERED.labels("lease_expired").inc(again)
        metrics.RECOVERED.labels("failed").inc(failed)
        metrics.RECOVERED.labels("republished").inc(len(waiting))
        if again or failed:
            self.recovered += again
            logger.warning(
                "recovered %d deliveries whose worker was lost; %d out of attempts",
                again,
                failed,
                extra={"action": "delivery.recovered"},
            )
        self.republished += len(waiting)
        for row in waiting:
            logger.warning(
                "notification %d pending for %.0fs; publishing its delivery again",
                row["id"],
                row["pending_seconds"],
                extra={
                    "action": "delivery.republished",
                    "notification_id": row["id"],
                    "event_id": str(row["event_id"]),
                    "pending_seconds": round(row["pending_seconds"], 1),
                },
            )
        return Swept(again, failed, len(waiting))

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._interval)
            try:
                await self.sweep()
            except Exception as exc:
                if self._stopping:
                    # The stop's cancellation, turned into an error on its way.
                    return
                if not is_unavailable(exc):
                    # A bug, or a deadlock: logged in full. The next sweep may go
                    # through, and rows left behind would otherwise stay so until
                    # the process restarts.
                    logger.exception(
                        "lease sweep failed; the next is due in %gs",
                        self._interval,
                        extra={"action": "delivery.sweep_failed"},
                    )
                    continue
                # Away, read-only, a statement cancelled or past its timeout, a
                # table missing: it passes, and says so in one line.
                logger.warning(
                    "lease sweep skipped, the database cannot take it now: %r",
                    exc,
                    extra={"action": "delivery.sweep_failed"},
                )
