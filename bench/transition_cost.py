"""What the email sender's claim and sent statements cost as rows churn between two
vacuums, under each ``plan_cache_mode``.

Each round stores 900 email rows (``pending``), then claims them three at a time
with the email sender's batch claim (``email_sender.worker.CLAIM``) and marks each
three ``sent`` (``contracts.transitions.SENT_MANY``), as the sender does under load.
The table starts with 5,000 rows sent and analysed, so the statistics say that few
rows wait, as they do in a running system; nothing vacuums between rounds. Printed:
the wall time per statement in each round. A statement whose cost grows from round to
round is reading the index entries the earlier rounds left behind.

    uv run --no-sync python bench/transition_cost.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from contracts import transitions
from email_sender.worker import CLAIM
from tests.support import infra

HISTORY = 5000
ROUNDS = 10
CLAIMS_PER_ROUND = 300
BATCH = 3
MODES = ("auto", "force_generic_plan")


async def _store(conn: asyncpg.Connection, user: int, count: int) -> list[int]:
    """``count`` pending email rows for ``user``, each of an event of its own."""
    rows = await conn.fetch(
        """
        WITH events AS (
            INSERT INTO events (id, type, payload, occurred_at)
            SELECT gen_random_uuid(), 'comment.created', '{}', now()
            FROM generate_series(1, $2)
            RETURNING id
        )
        INSERT INTO notifications (event_id, user_id, email, title, message, type,
                                   channel, event_occurred_at)
        SELECT id, $1, 'reader@example.test', 'A reply', 'hello', 'email',
               'comment.reply', now()
        FROM events
        RETURNING id
        """,
        user,
        count,
    )
    return sorted(row["id"] for row in rows)


async def _measure(template: str, mode: str) -> list[tuple[float, float]]:
    """(claim µs, sent µs) per statement, for each round."""
    name = await infra.create_database(template)
    url = infra.database_url(name)
    try:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("SET synchronous_commit = off")
            user = await conn.fetchval(
                "INSERT INTO users (username, display_name, email) "
                "VALUES ('reader', 'Reader', 'reader@example.test') RETURNING id"
            )
            history = await _store(conn, user, HISTORY)
            await conn.execute(
                "UPDATE notifications SET status = 'sent' WHERE id = ANY($1)", history
            )
            await conn.execute("VACUUM ANALYZE notifications")
            if mode != "auto":
                await conn.execute(f"SET plan_cache_mode = {mode}")
            claim = await conn.prepare(CLAIM)
            sent = await conn.prepare(transitions.SENT_MANY)
            rounds = []
            for _ in range(ROUNDS):
                ids = await _store(conn, user, CLAIMS_PER_ROUND * BATCH)
                claiming = sending = 0.0
                for start in range(0, len(ids), BATCH):
                    batch = ids[start : start + BATCH]
                    began = time.perf_counter()
                    claimed = await claim.fetch(batch, 60.0)
                    between = time.perf_counter()
                    await sent.fetch(batch)
                    claiming += between - began
                    sending += time.perf_counter() - between
                    assert len(claimed) == BATCH
                rounds.append(
                    (
                        claiming * 1e6 / CLAIMS_PER_ROUND,
                        sending * 1e6 / CLAIMS_PER_ROUND,
                    )
                )
            return rounds
        finally:
            await conn.close()
    finally:
        await infra.drop_database(name)


async def main() -> None:
    template = infra.create_template()
    try:
        for mode in MODES:
            rounds = await _measure(template, mode)
            for label, column in (("claim", 0), ("sent", 1)):
                figures = [round(r[column]) for r in rounds]
                print(
                    f"{mode:<19} {label:<5} µs per statement, round by round: "
                    f"{figures}; median {statistics.median(figures):.0f}"
                )
    finally:
        await infra.drop_database(template)


if __name__ == "__main__":
    asyncio.run(main())
