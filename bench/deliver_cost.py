"""What the SSE gateway's delivery statement costs PostgreSQL, by batch size and by
how the server plans it.

The gateway puts a batch of in-app notifications into their users' inboxes with one
statement (``sse_gateway.inbox.DELIVER``). This script runs it on a private database
over 4,500 pending rows (three per comment, thirty users), in batches of the given
sizes, and prints the server backend's CPU time per comment (utime + stime from
``/proc``) and the wall time, under each ``plan_cache_mode``: ``auto`` (PostgreSQL's
default, which plans afresh for each run unless a generic plan looks no dearer) and
the two forced modes. A listener hears the NOTIFY of every row, as the gateway does.

    uv run --no-sync python bench/deliver_cost.py
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from bench import system
from contracts.db import create_pool
from contracts.settings import Settings
from sse_gateway import inbox
from tests.support import infra

COMMENTS = 1500
USERS = 30
BATCHES = (1, 3, 16, 64)
MODES = ("auto", "force_custom_plan", "force_generic_plan")
METADATA = {
    "reasons": ["reply"],
    "post_id": 1,
    "comment_id": 2,
    "commenter": {"id": 1, "username": "ann", "display_name": "Ann"},
    "url": "http://127.0.0.1:8081/?post=1#comment-2",
}


async def _pending_rows(conn: asyncpg.Connection) -> list[int]:
    users = [
        await conn.fetchval(
            "INSERT INTO users (username, display_name, email) VALUES ($1, $1, $2) "
            "RETURNING id",
            f"reader{n}",
            f"reader{n}@example.test",
        )
        for n in range(USERS)
    ]
    ids = []
    for number in range(COMMENTS):
        event = uuid.uuid4()
        await conn.execute(
            "INSERT INTO events (id, type, payload, occurred_at) "
            "VALUES ($1, 'comment.created', '{}', now())",
            event,
        )
        for user in users[number % 10 : number % 10 + 3]:
            ids.append(
                await conn.fetchval(
                    "INSERT INTO notifications (event_id, user_id, title, message, "
                    "type, channel, metadata, event_occurred_at) VALUES "
                    "($1, $2, 'A reply', 'hello', 'sse', 'comment.reply', $3, now()) "
                    "RETURNING id",
                    event,
                    user,
                    METADATA,
                )
            )
    await conn.execute("VACUUM ANALYZE notifications")
    return ids


async def _measure(template: str, batch: int, mode: str) -> tuple[float, float]:
    """(server CPU ms per comment, wall ms per comment) for one batch size and mode."""
    name = await infra.create_database(template)
    url = infra.database_url(name)
    try:
        pool = await create_pool(
            Settings(env="test", database_url=url), min_size=1, max_size=1
        )
        listener = await asyncpg.connect(url)
        await listener.add_listener(inbox.NOTIFY_CHANNEL, lambda *_: None)
        try:
            async with pool.acquire() as conn:
                ids = await _pending_rows(conn)
                if mode != "auto":
                    await conn.execute(f"SET plan_cache_mode = {mode}")
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                cpu_before, started = system.cpu_ms(pid), time.perf_counter()
                for start in range(0, len(ids), batch):
                    await inbox.deliver_many(conn, ids[start : start + batch])
                wall = time.perf_counter() - started
                cpu = (system.cpu_ms(pid) or 0.0) - (cpu_before or 0.0)
        finally:
            await listener.close()
            await pool.close()
    finally:
        await infra.drop_database(name)
    comments = len(ids) / 3
    return cpu / comments, wall * 1000 / comments


async def main() -> None:
    template = infra.create_template()
    print(f"{'rows per statement':>18}  {'plan_cache_mode':<20} server CPU   wall")
    try:
        for batch in BATCHES:
            for mode in MODES:
                cpu, wall = await _measure(template, batch, mode)
                print(
                    f"{batch:>18}  {mode:<20} {cpu:6.3f} ms  {wall:6.3f} ms per comment"
                )
    finally:
        await infra.drop_database(template)


if __name__ == "__main__":
    asyncio.run(main())
