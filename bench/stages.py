"""Where a comment's time goes on its way to the streams, from timestamps already kept.

The platform writes a timestamp at each transaction a notification passes through;
the bench knows when each comment was due and when each event was read. Per row:

* ``comments.created_at``: ``now()`` of the comments service's transaction;
* ``notifications.created_at``: ``now()`` of the dispatcher's transaction;
* ``notifications.sent_at`` of an ``sse`` row: ``now()`` of the gateway's
  transaction that puts it in the inbox (and sends the NOTIFY);
* ``notifications.sent_at`` of an ``email`` row: ``now()`` of the sender's
  transaction that marks it sent, after the SMTP exchange.

``now()`` is when a transaction began, not when it committed, so every stage runs
from one transaction's start to the next one's and holds the first transaction's
work and commit as well as the hop after it. docs/performance.md says what each
stage holds.

The bench's times are ``time.perf_counter()``; PostgreSQL's are the wall clock of
the same machine. One offset, taken with :func:`clock_offset`, converts between the
two. An error in it moves time between the first and the last stage only: the
stages of a row add up to due → event exactly, whatever the offset.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import asyncpg

from bench.report import STAGE_LABELS, percentiles

# One row per notification of the given comments, times as Unix seconds.
ROWS = """
SELECT c.id AS comment_id,
       extract(epoch FROM c.created_at)::float8 AS stored_at,
       n.id AS notification_id,
       n.type,
       extract(epoch FROM n.created_at)::float8 AS dispatched_at,
       extract(epoch FROM n.sent_at)::float8 AS sent_at
FROM comments c
JOIN notifications n ON (n.metadata->>'comment_id')::bigint = c.id
WHERE c.id = ANY($1::bigint[])
"""


def clock_offset() -> float:
    """Wall-clock seconds minus ``perf_counter`` seconds, now."""
    before = time.perf_counter()
    wall = time.time()
    after = time.perf_counter()
    return wall - (before + after) / 2


async def fetch_rows(
    conn: asyncpg.Connection, comment_ids: Iterable[int], timeout: float = 30.0
) -> list[asyncpg.Record]:
    return await conn.fetch(ROWS, list(comment_ids), timeout=timeout)


def breakdown(
    due: Mapping[int, float],
    rows: Iterable[Mapping[str, Any]],
    streamed: Mapping[int, float],
    offset: float,
) -> dict[str, dict[str, float | None]]:
    """Percentiles of each stage, in milliseconds.

    ``due``: comment id → due time (perf_counter); ``rows``: as :data:`ROWS` returns
    them; ``streamed``: notification id → when its event was read (perf_counter);
    ``offset``: :func:`clock_offset`. A comment counts once in the first two
    stages (its rows share both timestamps), each row once in the others; a row
    not yet sent, or whose event never came, is left out of the stages it lacks.
    """
    samples: dict[str, list[float]] = defaultdict(list)
    dispatched: dict[int, float] = {}
    stored: dict[int, float] = {}
    for row in rows:
        comment = row["comment_id"]
        if comment not in due:
            continue
        stored[comment] = row["stored_at"]
        # A dispatcher handling a batch of events in one transaction gives them all
        # the same start; the earliest row stands for the comment.
        dispatched[comment] = min(
            row["dispatched_at"], dispatched.get(comment, row["dispatched_at"])
        )
        sent = row["sent_at"]
        if row["type"] == "email" and sent is not None:
            samples["dispatched_to_email_sent"].append(sent - row["dispatched_at"])
        if row["type"] != "sse" or sent is None:
            continue
        samples["dispatched_to_inbox"].append(sent - row["dispatched_at"])
        arrived = streamed.get(row["notification_id"])
        if arrived is not None:
            samples["inbox_to_stream"].append(arrived + offset - sent)
            samples["due_to_stream"].append(arrived - due[comment])
    for comment, at in stored.items():
        samples["due_to_stored"].append(at - (due[comment] + offset))
        samples["stored_to_dispatched"].append(dispatched[comment] - at)
    return {
        key: percentiles([s * 1000 for s in samples.get(key, [])])
        for key in STAGE_LABELS
    }
