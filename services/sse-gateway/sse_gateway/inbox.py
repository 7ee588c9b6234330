"""The in-app inbox in PostgreSQL: delivering into it, replaying it, reading it.

Ordering. A notification enters a user's inbox with the next number of that user's
sequence (``inbox_sequences``). Taking the number locks the user's sequence row until
the transaction commits, so one user's numbers are handed out in commit order: a
stream that has shown number ``n`` has seen every row numbered below ``n``, and
replaying ``inbox_seq > n`` misses nothing even when notification ids commit out of
order. Browsers see the notification id as the SSE ``id:``; the gateway turns it
back into the user's sequence number on reconnect.

Batches. :func:`deliver_many` puts many notifications into their inboxes in one
transaction of a few statements. It locks the rows in id order and then the users'
sequence rows in user order, the same order in every replica, so two replicas
delivering for the same users wait for each other instead of deadlocking. Each user
gets one range of numbers, handed out to that user's rows in id order; the order
in which numbers become visible is still commit order, because the sequence row
stays locked until the whole batch commits.

Fan-out. The transaction that delivers into the inbox also sends
``NOTIFY notiflow_inbox``, one per notification; PostgreSQL delivers them at commit,
in the order they were sent, to every gateway replica, each of which writes them to
its own open connections for that user.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

NOTIFY_CHANNEL = "notiflow_inbox"
# Ids and sequence numbers are PostgreSQL bigints; a number beyond this one names
# no row, and asyncpg refuses to send it.
MAX_ID = 2**63 - 1
# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more; bigger events are sent
# as a reference and read back by each replica.
MAX_INLINE_PAYLOAD = 7000

EVENT_FIELDS = """
id, user_id, title, message, channel, type, priority, metadata, created_at,
inbox_seq, read_at, event_id
"""

# Only rows still waiting are locked. A final row that stayed locked while the batch
# waits for a user's sequence row could deadlock with a read-state change, which
# takes the sequence row first and then updates that user's delivered rows.
LOCK_WAITING = """
SELECT id, user_id FROM notifications
WHERE id = ANY($1::bigint[]) AND type = 'sse'
  AND status NOT IN ('sent', 'failed', 'skipped')
ORDER BY id
FOR UPDATE
"""

# What the rows not locked are now. One that an operator's replay made waiting
# again since the lock was tried is answered with that status and left alone: the
# replay's own message delivers it.
STATUS_OF = """
SELECT id, status FROM notifications WHERE id = ANY($1::bigint[]) AND type = 'sse'
"""

# One range per user: ``last_seq`` grows by the number of rows the user gets, and
# the range ends at the value returned. Rows are inserted in user order, so the
# sequence rows are locked in that order.
RESERVE_SEQS = """
INSERT INTO inbox_sequences (user_id, last_seq)
SELECT user_id, taken FROM unnest($1::bigint[], $2::bigint[]) AS t(user_id, taken)
ORDER BY user_id
ON CONFLICT (user_id) DO UPDATE
SET last_seq = inbox_sequences.last_seq + EXCLUDED.last_seq
RETURNING user_id, last_seq
"""

# ``earlier`` sees the snapshot from before the UPDATE (every part of a statement
# does): each user's unread count without this batch. The caller adds the batch's
# rows one by one, which gives the count a one-at-a-time delivery would have shown.
MARK_DELIVERED = f"""
WITH delivered AS (
    UPDATE notifications
    SET status = 'sent', inbox_seq = t.seq, attempts = attempts + 1,
        sent_at = now(), updated_at = now(), last_error = NULL
    FROM unnest($1::bigint[], $2::bigint[]) AS t(delivered_id, seq)
    WHERE id = t.delivered_id
    RETURNING {EVENT_FIELDS}, archived_at
), earlier AS (
    SELECT user_id, count(*) AS unread FROM notifications
    WHERE user_id = ANY($3::bigint[]) AND inbox_seq IS NOT NULL
      AND read_at IS NULL AND archived_at IS NULL
    GROUP BY user_id
)
SELECT delivered.*, coalesce(earlier.unread, 0) AS unread_before
FROM delivered LEFT JOIN earlier USING (user_id)
ORDER BY delivered.id
"""

# unnest yields the payloads in array order, and PostgreSQL delivers notifications
# in the order they were sent.
NOTIFY_ALL = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload"

CURRENT_SEQ = "SELECT last_seq FROM inbox_sequences WHERE user_id = $1"

SEQ_OF = "SELECT inbox_seq FROM notifications WHERE id = $1 AND user_id = $2"

REPLAY = f"""
SELECT {EVENT_FIELDS} FROM notifications
WHERE user_id = $1 AND inbox_seq > $2
ORDER BY inbox_seq
LIMIT $3
"""

BY_ID = f"SELECT {EVENT_FIELDS} FROM notifications WHERE id = $1"

LIST = f"""
SELECT {EVENT_FIELDS} FROM notifications
WHERE user_id = $1 AND inbox_seq IS NOT NULL AND archived_at IS NULL
  AND ($2::bigint IS NULL OR inbox_seq < $2)
ORDER BY inbox_seq DESC
LIMIT $3
"""

UNREAD = """
SELECT count(*) FROM notifications
WHERE user_id = $1 AND inbox_seq IS NOT NULL AND read_at IS NULL
  AND archived_at IS NULL
"""

MARK_READ = """
UPDATE notifications SET read_at = now(), updated_at = now()
WHERE user_id = $1 AND id = ANY($2::bigint[]) AND inbox_seq IS NOT NULL
  AND read_at IS NULL
RETURNING id
"""

MARK_ALL_READ = """
UPDATE notifications SET read_at = now(), updated_at = now()
WHERE user_id = $1 AND inbox_seq IS NOT NULL AND read_at IS NULL
RETURNING id
"""

ARCHIVE = """
UPDATE notifications SET archived_at = now(), read_at = coalesce(read_at, now()),
    updated_at = now()
WHERE user_id = $1 AND id = $2 AND inbox_seq IS NOT NULL AND archived_at IS NULL
RETURNING id
"""

OWNS = """
SELECT 1 FROM notifications WHERE user_id = $1 AND id = $2 AND inbox_seq IS NOT NULL
"""


def event(row: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    """The JSON a browser receives for one notification."""

    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "id": row["id"],
        "seq": row["inbox_seq"],
        "event_id": str(row["event_id"]),
        "title": row["title"],
        "message": row["message"],
        "channel": row["channel"],
        "type": row["type"],
        "priority": row["priority"],
        "metadata": {k: v for k, v in (row["metadata"] or {}).items() if k != "html"},
        "created_at": iso(row["created_at"]),
        "read_at": iso(row["read_at"]),
    }


async def deliver(conn: asyncpg.Connection, notification_id: int) -> str | None:
    """Put one SSE notification into its user's inbox; see :func:`deliver_many`."""
    return (await deliver_many(conn, [notification_id]))[0]


async def deliver_many(
    conn: asyncpg.Connection, notification_ids: Sequence[int]
) -> list[str | None]:
    """Put SSE notifications into their users' inboxes and announce each one.

    Returns one answer per id, in order: None when this call delivered it, the
    previous status when the row was already final (nothing done), or "missing"
    when there is no such SSE row. An id given twice is delivered once; its later
    copies answer like a redelivery would. Must run inside a transaction.
    """
    wanted = sorted({n for n in notification_ids if 1 <= n <= MAX_ID})
    previous: dict[int, str | None] = dict.fromkeys(notification_ids, "missing")
    if not wanted:
        return [previous[n] for n in notification_ids]

    rows = await conn.fetch(LOCK_WAITING, wanted)
    if len(rows) < len(wanted):
        locked = {row["id"] for row in rows}
        others = [n for n in wanted if n not in locked]
        for row in await conn.fetch(STATUS_OF, others):
            previous[row["id"]] = row["status"]
    if rows:
        await _deliver_locked(conn, rows)
        previous.update(dict.fromkeys((row["id"] for row in rows), None))

    answers: list[str | None] = []
    seen: set[int] = set()
    for n in notification_ids:
        answer = previous[n]
        if n in seen and answer is None:
            answer = "sent"
        seen.add(n)
        answers.append(answer)
    return answers


async def _deliver_locked(
    conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]
) -> None:
    """Number, mark and announce rows locked by ``LOCK_WAITING``, in id order."""
    taken: dict[int, int] = {}
    for row in rows:
        taken[row["user_id"]] = taken.get(row["user_id"], 0) + 1
    users = sorted(taken)
    reserved = await conn.fetch(RESERVE_SEQS, users, [taken[u] for u in users])
    next_seq = {r["user_id"]: r["last_seq"] - taken[r["user_id"]] + 1 for r in reserved}

    ids, seqs = [], []
    for row in rows:
        ids.append(row["id"])
        seqs.append(next_seq[row["user_id"]])
        next_seq[row["user_id"]] += 1
    delivered = await conn.fetch(MARK_DELIVERED, ids, seqs, users)

    unread: dict[int, int] = {}
    payloads = []
    for row in delivered:
        user_id = row["user_id"]
        count = unread.get(user_id, row["unread_before"])
        if row["read_at"] is None and row["archived_at"] is None:
            count += 1
        unread[user_id] = count
        data = {**event(row), "unread": count}
        payloads.append(payload({"kind": "notification", "u": user_id, "event": data}))
    await conn.execute(NOTIFY_ALL, NOTIFY_CHANNEL, payloads)


async def announce(conn: asyncpg.Connection, message: dict[str, Any]) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload(message))


def payload(message: dict[str, Any]) -> str:
    """The NOTIFY payload for ``message``; a reference when it would be too big."""
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
    if (
        len(text.encode()) > MAX_INLINE_PAYLOAD
        and message.get("kind") == "notification"
    ):
        text = json.dumps(
            {
                "kind": "notification",
                "u": message["u"],
                "ref": message["event"]["id"],
                "unread": message["event"].get("unread"),
            }
        )
    return text
