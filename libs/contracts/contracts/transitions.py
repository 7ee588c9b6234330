"""The notification status machine, shared by every sender.

Each transition is one conditional UPDATE, so two workers can never both move a
row::

    pending ──claim──▶ sending ──▶ sent
    retrying ─(due)─▶     │    ──▶ retrying   (transient failure; next_attempt_at)
    sending ─(lease       │    ──▶ failed     (permanent, or attempts used up)
      expired)─▶          └──▶ skipped    (nothing to deliver to)

    pending, retrying ──preference off──▶ skipped

A claim takes a ``pending`` row, a ``retrying`` row whose time has come, or a
``sending`` row whose lease ran out (its worker died). Every later transition
applies only to a row still ``sending``, and may merge a patch into the row's
metadata (top-level keys replace those already there).

A user who turns a channel type off has their rows of it that wait for a claim
(``pending`` or ``retrying``) made ``skipped`` by the gateway
(``sse_gateway.preferences``); the sender then finds the row unclaimable and
acks its message (:func:`unclaimed`). That update cannot see a row the
dispatcher was storing while the change committed, nor one an operator sets back
to ``pending`` later (``requeue-failed``), so the claim looks at the preference
too: a row whose user has its type off is made ``skipped`` instead of claimed.
Only a row already ``sending`` when the change commits still goes out.

A sender that handles messages in batches claims all of a batch's rows with one
statement (:func:`claim_many_sql`), asks why the rest were not claimed with one
more (:func:`statuses`, :func:`unclaimed`), and records every delivered row with
one statement (:data:`SENT_MANY`). The conditions are those of the single-row
statements, so the two kinds of sender may work side by side on one queue.

Every transition names its rows by id, and finds them through the primary key
alone: the conditions on ``status`` are written as ``CASE`` expressions, which no
index can answer. The partial indexes on ``status`` (for the sweepers) keep an
entry for every version a row has had in that status until ``VACUUM`` removes it,
so a plan that combined them with the ids, as PostgreSQL chooses to when its
statistics say few rows wait, would read every row sent since the last vacuum on
each call and grow slower with every one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import asyncpg

from contracts.consumer import DeadLetter, RetryLater

# The user has turned the row's channel type off (one primary-key lookup).
_TURNED_OFF = """EXISTS (
    SELECT FROM notification_preferences p
    WHERE p.user_id = notifications.user_id AND p.type = notifications.type
      AND NOT p.enabled)"""

# Returns the rows it claimed and those it skipped, with ``status`` saying which.
_CLAIM = f"""
UPDATE notifications
SET status = CASE WHEN {_TURNED_OFF} THEN 'skipped' ELSE 'sending' END,
    attempts = attempts + CASE WHEN {_TURNED_OFF} THEN 0 ELSE 1 END,
    last_error = CASE WHEN {_TURNED_OFF} THEN type || ' disabled by preference'
                      ELSE last_error END,
    next_attempt_at = CASE WHEN {_TURNED_OFF} THEN NULL ELSE next_attempt_at END,
    lease_expires_at = CASE WHEN {_TURNED_OFF} THEN NULL
                            ELSE now() + make_interval(secs => $2) END,
    updated_at = now()
WHERE {{target}} AND type = '{{channel_type}}'
  AND CASE status
        WHEN 'pending' THEN true
        WHEN 'retrying' THEN coalesce(next_attempt_at <= now(), true)
        WHEN 'sending' THEN lease_expires_at < now()
        ELSE false
      END
RETURNING {{returning}}, status
"""


def _claim_sql(channel_type: str, returning: str, target: str) -> str:
    if channel_type not in ("email", "sse", "push"):
        raise ValueError(f"unknown channel type {channel_type!r}")
    return _CLAIM.format(target=target, channel_type=channel_type, returning=returning)


def claim_sql(channel_type: str, returning: str) -> str:
    """The UPDATE that claims one row of ``channel_type`` ($1 id, $2 lease seconds).

    It returns ``returning`` and ``status``: ``sending`` for a row claimed,
    ``skipped`` for one whose user has turned its type off (see the module's
    docstring); :func:`claim` tells them apart.
    """
    return _claim_sql(channel_type, returning, "id = $1")


def claim_many_sql(channel_type: str, returning: str) -> str:
    """The UPDATE that claims every claimable row of ``channel_type`` among $1 (ids).

    $2 is the lease in seconds. Rows that cannot be claimed are left out of the
    result; :func:`statuses` and :func:`unclaimed` say why. Rows skipped because
    their user turned the type off come back with ``status`` ``skipped``, the
    claimed ones with ``sending``: use only the latter. Two batches share rows
    only when a message was delivered twice; should their claims ever deadlock,
    PostgreSQL cancels one, and its consumer handles those messages one by one.
    """
    return _claim_sql(channel_type, returning, "id = ANY($1::bigint[])")


STATUS = """
SELECT type, status,
       greatest(0, extract(epoch FROM next_attempt_at - now()))::float8 AS due_in
FROM notifications WHERE id = $1
"""

STATUSES = """
SELECT id, type, status,
       greatest(0, extract(epoch FROM next_attempt_at - now()))::float8 AS due_in
FROM notifications WHERE id = ANY($1::bigint[])
"""

# The row is ``sending``, in a form no index answers (see the module's docstring).
_STILL_SENDING = "CASE status WHEN 'sending' THEN true ELSE false END"

_SETTLE = f"""
UPDATE notifications
SET status = '{{status}}', updated_at = now(), lease_expires_at = NULL,
    metadata = metadata || $2::jsonb, {{extra}}
WHERE id = $1 AND {_STILL_SENDING}
"""

SENT = _SETTLE.format(
    status="sent", extra="sent_at = now(), last_error = NULL, next_attempt_at = NULL"
)
RETRYING = _SETTLE.format(
    status="retrying",
    extra="last_error = $3, next_attempt_at = now() + make_interval(secs => $4)",
)
# A claimed row its sender never got to try (no connection to the server came
# free in time): retried after the delay, the claim's attempt given back.
UNTRIED = _SETTLE.format(
    status="retrying",
    extra="attempts = greatest(attempts - 1, 0), last_error = $3, "
    "next_attempt_at = now() + make_interval(secs => $4)",
)
FAILED = _SETTLE.format(
    status="failed", extra="last_error = $3, next_attempt_at = NULL"
)
SKIPPED = _SETTLE.format(
    status="skipped", extra="last_error = $3, next_attempt_at = NULL"
)

# Every row of $1 (ids) still ``sending`` is now ``sent``; metadata is left as it is.
SENT_MANY = f"""
UPDATE notifications
SET status = 'sent', updated_at = now(), lease_expires_at = NULL,
    sent_at = now(), last_error = NULL, next_attempt_at = NULL
WHERE id = ANY($1::bigint[]) AND {_STILL_SENDING}
"""


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
    channel_type: str | None = None,
) -> asyncpg.Record | None:
    """Claim a row with ``statement`` (from :func:`claim_sql`), or say why not.

    A missing row is a dead letter. A ``retrying`` row whose time has not come (a
    message replayed early, or a delay shorter than a Retry-After) is parked again.
    Otherwise the row is final or held by a live worker: None, and the message is
    done, logged on the caller's ``log`` with ``action``.
    """
    row = await conn.fetchrow(statement, notification_id, lease_seconds)
    if row is not None and row["status"] == "sending":
        return row
    if row is not None:
        log.info(
            "notification skipped: its user turned %s off",
            channel_type or "this type",
            extra={"action": action},
        )
        return None
    current = await conn.fetchrow(STATUS, notification_id)
    outcome = unclaimed(
        notification_id,
        current,
        delays,
        log=log,
        action=action,
        channel_type=channel_type,
    )
    if outcome is not None:
        raise outcome
    return None


async def statuses(
    conn: asyncpg.Connection, notification_ids: Sequence[int]
) -> dict[int, asyncpg.Record]:
    """The status of each row that exists among ``notification_ids``, by id."""
    rows = await conn.fetch(STATUSES, list(notification_ids))
    return {row["id"]: row for row in rows}


def unclaimed(
    notification_id: int,
    current: asyncpg.Record | None,
    delays: Sequence[int],
    *,
    log: logging.Logger,
    action: str,
    channel_type: str | None = None,
) -> DeadLetter | RetryLater | None:
    """What becomes of the message of a row that could not be claimed.

    ``current`` is the row's :data:`STATUS` (or its line of :data:`STATUSES`), None
    when it is missing; a row of another type than ``channel_type`` is a dead
    letter too. The answer is the one :func:`claim` raises, or None when the
    message is done; that case is logged on ``log`` with ``action``, so call this in
    the message's own logging context.
    """
    if current is None:
        return DeadLetter(f"notification {notification_id} not found")
    if channel_type is not None and current["type"] != channel_type:
        # Routed to the wrong sender: no claim of this type can ever take it.
        return DeadLetter(
            f"notification {notification_id} is of type {current['type']}, "
            f"not {channel_type}"
        )
    if current["status"] == "retrying" and current["due_in"] > 0:
        due_in = float(current["due_in"])
        return RetryLater(f"not due for {due_in:.1f}s", retry_level(delays, due_in))
    log.info(
        "notification is %s; nothing to send",
        current["status"],
        extra={"action": action},
    )
    return None
