"""The notification status machine, shared by every sender.

Each transition is one conditional UPDATE, so two workers can never both move a
row::

    pending ──claim──▶ sending ──▶ sent
    retrying ─(due)─▶     │    ──▶ retrying   (transient failure; next_attempt_at)
    sending ─(lease       │    ──▶ failed     (permanent, or attempts used up)
      expired)─▶          └──▶ skipped    (nothing to deliver to)

A claim takes a ``pending`` row, a ``retrying`` row whose time has come, or a
``sending`` row whose lease ran out (its worker died). Every later transition
applies only to a row still ``sending``, and may merge a patch into the row's
metadata (top-level keys replace those already there).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import asyncpg

from contracts.consumer import DeadLetter, RetryLater


def claim_sql(channel_type: str, returning: str) -> str:
    """The UPDATE that claims one row of ``channel_type`` ($1 id, $2 lease seconds)."""
    if channel_type not in ("email", "sse", "push"):
        raise ValueError(f"unknown channel type {channel_type!r}")
    return f"""
UPDATE notifications
SET status = 'sending', attempts = attempts + 1, updated_at = now(),
    lease_expires_at = now() + make_interval(secs => $2)
WHERE id = $1 AND type = '{channel_type}'
  AND (status = 'pending'
       OR (status = 'retrying' AND coalesce(next_attempt_at <= now(), true))
       OR (status = 'sending' AND lease_expires_at < now()))
RETURNING {returning}
"""


STATUS = """
SELECT status,
       greatest(0, extract(epoch FROM next_attempt_at - now()))::float8 AS due_in
FROM notifications WHERE id = $1
"""

_SETTLE = """
UPDATE notifications
SET status = '{status}', updated_at = now(), lease_expires_at = NULL,
    metadata = metadata || $2::jsonb, {extra}
WHERE id = $1 AND status = 'sending'
"""

SENT = _SETTLE.format(
    status="sent", extra="sent_at = now(), last_error = NULL, next_attempt_at = NULL"
)
RETRYING = _SETTLE.format(
    status="retrying",
    extra="last_error = $3, next_attempt_at = now() + make_interval(secs => $4)",
)
FAILED = _SETTLE.format(
    status="failed", extra="last_error = $3, next_attempt_at = NULL"
)
SKIPPED = _SETTLE.format(
    status="skipped", extra="last_error = $3, next_attempt_at = NULL"
)


async def settle(
    conn: asyncpg.Connection,
    statement: str,
    notification_id: int,
    patch: dict[str, Any] | None = None,
    *args: object,
) -> None:
    """Move a claimed row on with one of the statements above."""
    await conn.execute(statement, notification_id, patch or {}, *args)


def retry_level(delays: Sequence[int], wait: float) -> int:
    """The shortest retry delay not shorter than ``wait``, else the longest."""
    levels = sorted(delays)
    return next((level for level in levels if level >= wait), levels[-1])


async def claim(
    conn: asyncpg.Connection,
    statement: str,
    notification_id: int,
    lease_seconds: float,
    delays: Sequence[int],
    *,
    log: logging.Logger,
    action: str,
) -> asyncpg.Record | None:
    """Claim a row with ``statement`` (from :func:`claim_sql`), or say why not.

    A missing row is a dead letter. A ``retrying`` row whose time has not come (a
    message replayed early, or a delay shorter than a Retry-After) is parked again.
    Otherwise the row is final or held by a live worker: None, and the message is
    done, logged on the caller's ``log`` with ``action``.
    """
    row = await conn.fetchrow(statement, notification_id, lease_seconds)
    if row is not None:
        return row
    current = await conn.fetchrow(STATUS, notification_id)
    if current is None:
        raise DeadLetter(f"notification {notification_id} not found")
    if current["status"] == "retrying" and current["due_in"] > 0:
        due_in = float(current["due_in"])
        raise RetryLater(f"not due for {due_in:.1f}s", retry_level(delays, due_in))
    log.info(
        "notification is %s; nothing to send",
        current["status"],
        extra={"action": action},
    )
    return None
