"""The in-app inbox in PostgreSQL: delivering into it, replaying it, reading it.

Ordering. A notification enters a user's inbox with the next number of that user's
sequence (``inbox_sequences``). Taking the number locks the user's sequence row until
the transaction commits, so one user's numbers are handed out in commit order: a
stream that has shown number ``n`` has seen every row numbered below ``n``, and
replaying ``inbox_seq > n`` misses nothing even when notification ids commit out of
order. Browsers see the notification id as the SSE ``id:``; the gateway turns it
back into the user's sequence number on reconnect.

Batches. :func:`deliver_many` puts many notifications into their inboxes in one
statement. It locks the rows in id order and then the users'
sequence rows in user order, the same order in every replica, so two replicas
delivering for the same users wait for each other instead of deadlocking. Each user
gets one range of numbers, handed out to that user's rows in id order; the order
in which numbers become visible is still commit order, because the sequence row
stays locked until the whole batch commits.

Fan-out. The statement that delivers into the inbox also sends
``NOTIFY notiflow_inbox``, one per notification, carrying the event JSON that
:func:`event` makes of the row (written by PostgreSQL, so that the rows need not
come back to the gateway first); PostgreSQL delivers them at commit,
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


def _iso(column: str) -> str:
    """``column`` (a timestamptz) as Python's ``isoformat()`` writes it in UTC."""
    utc = f"({column} AT TIME ZONE 'UTC')"
    return f"""CASE WHEN {column} IS NULL THEN NULL ELSE
        to_char({utc}, 'YYYY-MM-DD"T"HH24:MI:SS')
        || CASE WHEN extract(microseconds FROM {column})::bigint % 1000000 = 0
                THEN '' ELSE to_char({utc}, '.US') END
        || '+00:00' END"""


# Delivering a batch is one statement, so one transaction and one round trip:
#
# - ``locked``: the rows still waiting, locked in id order. Only those: a final row
#   that stayed locked while the batch waits for a user's sequence row could
#   deadlock with a read-state change, which takes the sequence row first and then
#   updates that user's delivered rows. ``taken`` reads all of ``locked`` before
#   ``reserved`` takes its first sequence row, so every notification row is locked
#   before any sequence row.
# - ``reserved``: one range of numbers per user; ``last_seq`` grows by the number of
#   rows the user gets, locking the sequence rows in user order. It also reads the
#   user's unread count, as the latest commit left it: the lock is held, and this
#   batch's own rows are counted only by the triggers that run when the statement
#   ends (migration 0004).
# - ``delivered``: each row gets the next number of its user's range, in id order.
# - ``counted``: each row's unread count is the one a one-at-a-time delivery would
#   have shown: the count before the batch plus the batch's rows up to this one.
# - the NOTIFY of each row, in id order; PostgreSQL delivers them at commit, in the
#   order they were sent. The event is the JSON :func:`event` makes of the row, plus
#   the count; one bigger than $3 bytes (PostgreSQL refuses 8000) is sent as a
#   reference instead, for each replica to read back.
#
# - ``turned_off``: rows of a user who has turned live notifications off since
#   they were stored (the change could not see a row the dispatcher was still
#   storing) become ``skipped``; ``locked`` leaves them out.
#
# Rows not returned were not waiting, are not SSE rows, or were skipped.
_TURNED_OFF = """EXISTS (
    SELECT FROM notification_preferences p
    WHERE p.user_id = notifications.user_id AND p.type = 'sse' AND NOT p.enabled)"""

DELIVER = f"""
WITH turned_off AS (
    UPDATE notifications
    SET status = 'skipped', last_error = 'sse disabled by preference',
        next_attempt_at = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE id = ANY($1::bigint[]) AND type = 'sse'
      AND status NOT IN ('sent', 'failed', 'skipped')
      AND {_TURNED_OFF}
), locked AS (
    SELECT id, user_id FROM notifications
    WHERE id = ANY($1::bigint[]) AND type = 'sse'
      AND status NOT IN ('sent', 'failed', 'skipped')
      AND NOT {_TURNED_OFF}
    ORDER BY id
    FOR UPDATE
), taken AS (
    SELECT user_id, count(*) AS n FROM locked GROUP BY user_id
), reserved AS (
    INSERT INTO inbox_sequences (user_id, last_seq)
    SELECT user_id, n FROM taken ORDER BY user_id
    ON CONFLICT (user_id) DO UPDATE
    SET last_seq = inbox_sequences.last_seq + EXCLUDED.last_seq
    RETURNING user_id, last_seq, unread
), numbered AS (
    SELECT locked.id,
           reserved.last_seq - taken.n
           + row_number() OVER (PARTITION BY locked.user_id ORDER BY locked.id) AS seq
    FROM locked
    JOIN taken USING (user_id)
    JOIN reserved USING (user_id)
), delivered AS (
    UPDATE notifications
    SET status = 'sent', inbox_seq = numbered.seq, attempts = attempts + 1,
        sent_at = now(), updated_at = now(), last_error = NULL
    FROM numbered
    WHERE notifications.id = numbered.id
    RETURNING notifications.*
), counted AS (
    SELECT delivered.*,
           reserved.unread + sum(
               (delivered.read_at IS NULL AND delivered.archived_at IS NULL)::int
           ) OVER (PARTITION BY delivered.user_id ORDER BY delivered.id) AS unread
    FROM delivered JOIN reserved USING (user_id)
), announced AS (
    SELECT id, user_id, unread, json_build_object(
        'kind', 'notification',
        'u', user_id,
        'event', json_build_object(
            'id', id,
            'seq', inbox_seq,
            'event_id', event_id::text,
            'title', title,
            'message', message,
            'channel', channel,
            'type', type,
            'priority', priority,
            'metadata', metadata - 'html',
            'created_at', {_iso("created_at")},
            'read_at', {_iso("read_at")},
            'unread', unread
        )
    )::text AS inline
    FROM counted
    ORDER BY id
)
SELECT id, pg_notify($2, CASE
    WHEN octet_length(inline) <= $3 THEN inline
    ELSE json_build_object(
        'kind', 'notification', 'u', user_id, 'ref', id, 'unread', unread
    )::text
END)
FROM announced
"""

# What the rows not delivered are now. One that an operator's replay made waiting
# again since the batch was tried is answered with that status and left alone: the
# replay's own message delivers it.
STATUS_OF = """
SELECT id, type, status FROM notifications WHERE id = ANY($1::bigint[])
"""

# The answer of :func:`deliver_many` for a row that exists but is no SSE row.
OTHER_TYPE = "of type {type}"

CURRENT_SEQ = "SELECT last_seq FROM inbox_sequences WHERE user_id = $1"

SEQ_OF = "SELECT inbox_seq FROM notifications WHERE id = $1 AND user_id = $2"

# Archived rows come back too, flagged, and are passed over by the stream rather
# than left out here: the stream's place then moves past them, and a live copy of
# one, announced before it was archived, is dropped like any row already replayed.
REPLAY = f"""
SELECT {EVENT_FIELDS}, archived_at IS NOT NULL AS archived FROM notifications
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

# Kept by triggers as rows are delivered, read, archived or deleted (migration 0004).
UNREAD = """
SELECT coalesce((SELECT unread FROM inbox_sequences WHERE user_id = $1), 0)
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
    previous status when the row was already final (nothing done), "missing" when
    there is no such row, or :data:`OTHER_TYPE` naming the type of a row that is
    not an SSE row (nothing done either). An id given twice is delivered once; its later
    copies answer like a redelivery would. The delivery is one statement: outside a
    transaction it commits on its own.
    """
    wanted = sorted({n for n in notification_ids if 1 <= n <= MAX_ID})
    previous: dict[int, str | None] = dict.fromkeys(notification_ids, "missing")
    if not wanted:
        return [previous[n] for n in notification_ids]

    delivered = {
        row["id"]
        for row in await conn.fetch(DELIVER, wanted, NOTIFY_CHANNEL, MAX_INLINE_PAYLOAD)
    }
    if len(delivered) < len(wanted):
        others = [n for n in wanted if n not in delivered]
        for row in await conn.fetch(STATUS_OF, others):
            previous[row["id"]] = (
                row["status"]
                if row["type"] == "sse"
                else OTHER_TYPE.format(type=row["type"])
            )
    previous.update(dict.fromkeys(delivered, None))

    answers: list[str | None] = []
    seen: set[int] = set()
    for n in notification_ids:
        answer = previous[n]
        if n in seen and answer is None:
            answer = "sent"
        seen.add(n)
        answers.append(answer)
    return answers


# unnest yields the payloads in array order, and PostgreSQL delivers notifications
# in the order they were sent.
NOTIFY_EACH = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload"


async def announce(conn: asyncpg.Connection, message: dict[str, Any]) -> None:
    """Send ``message`` to every replica, in as many NOTIFYs as its ids need."""
    await conn.execute(
        NOTIFY_EACH, NOTIFY_CHANNEL, [payload(part) for part in _parts(message)]
    )


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    """``message`` split by its ``ids`` into parts that each fit in a NOTIFY.

    A read-state change names every notification it changed, and marking all read
    can change thousands: more than one payload holds. Each part carries the same
    unread count, the count after the whole change.
    """
    ids = message.get("ids")
    if not ids or len(payload(message).encode()) <= MAX_INLINE_PAYLOAD:
        return [message]
    overhead = len(payload({**message, "ids": []}).encode())
    # A bigint is at most 19 digits and a sign; one more for the comma.
    per_part = max(1, (MAX_INLINE_PAYLOAD - overhead) // 21)
    return [
        {**message, "ids": ids[start : start + per_part]}
        for start in range(0, len(ids), per_part)
    ]


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
