"""The in-app inbox in PostgreSQL: delivering into it, replaying it, reading it.

Ordering. A notification enters a user's inbox with the next number of that user's
sequence (``inbox_sequences``). Taking the number locks the user's sequence row until
the transaction commits, so one user's numbers are handed out in commit order: a
stream that has shown number ``n`` has seen every row numbered below ``n``, and
replaying ``inbox_seq > n`` misses nothing even when notification ids commit out of
order. Browsers see the notification id as the SSE ``id:``; the gateway turns it
back into the user's sequence number on reconnect.

Fan-out. The transaction that delivers into the inbox also sends
``NOTIFY notiflow_inbox``; PostgreSQL delivers it at commit to every gateway replica,
each of which writes it to its own open connections for that user.
"""

from __future__ import annotations

import json
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

LOCK_ROW = """
SELECT id, user_id, status FROM notifications
WHERE id = $1 AND type = 'sse' FOR UPDATE
"""

NEXT_SEQ = """
INSERT INTO inbox_sequences (user_id, last_seq) VALUES ($1, 1)
ON CONFLICT (user_id) DO UPDATE SET last_seq = inbox_sequences.last_seq + 1
RETURNING last_seq
"""

MARK_DELIVERED = f"""
UPDATE notifications
SET status = 'sent', inbox_seq = $2, attempts = attempts + 1, sent_at = now(),
    updated_at = now(), last_error = NULL
WHERE id = $1
RETURNING {EVENT_FIELDS}
"""

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
    """Put an SSE notification into its user's inbox and announce it.

    Returns the previous status when the row was already final (nothing done), or
    None when this call delivered it. Must run inside a transaction.
    """
    row = await conn.fetchrow(LOCK_ROW, notification_id)
    if row is None:
        return "missing"
    if row["status"] in ("sent", "failed", "skipped"):
        return row["status"]
    seq = await conn.fetchval(NEXT_SEQ, row["user_id"])
    delivered = await conn.fetchrow(MARK_DELIVERED, notification_id, seq)
    unread = await conn.fetchval(UNREAD, row["user_id"])
    data = {**event(delivered), "unread": unread}
    await announce(conn, {"kind": "notification", "u": row["user_id"], "event": data})
    return None


async def announce(conn: asyncpg.Connection, message: dict[str, Any]) -> None:
    payload = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
    if (
        len(payload.encode()) > MAX_INLINE_PAYLOAD
        and message.get("kind") == "notification"
    ):
        payload = json.dumps(
            {
                "kind": "notification",
                "u": message["u"],
                "ref": message["event"]["id"],
                "unread": message["event"].get("unread"),
            }
        )
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload)
