"""An urgent delivery overtakes a backlog; SIGTERM or SIGHUP finishes what is in
flight."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import asyncpg
import pytest

from contracts.db import create_pool
from contracts.outbox import OutboxRelay, enqueue
from contracts.recovery import delivery
from contracts.settings import Settings
from tests.integration import helpers
from tests.integration.conftest import EmailSenderFactory
from tests.support.data import Demo
from tests.support.processes import Service
from tests.support.smtp import SmtpServer
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

BACKLOG = 30


async def _publish_through_the_outbox(
    settings: Settings, db: asyncpg.Connection, ids: list[int]
) -> None:
    rows = await db.fetch(
        "SELECT id, event_id, user_id, type, channel, priority, event_occurred_at "
        "FROM notifications WHERE id = ANY($1::bigint[]) ORDER BY id",
        ids,
    )
    pool = await create_pool(settings)
    try:
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, [delivery(row) for row in rows])
        relay = OutboxRelay(pool, settings)
        await relay.start()
        try:
            await relay.drain()
        finally:
            await relay.stop()
    finally:
        await pool.close()


async def test_a_high_priority_email_overtakes_a_backlog_of_low_ones(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    low = [
        await helpers.email_row(db, demo.bob, "bob@example.com", priority=0)
        for _ in range(BACKLOG)
    ]
    urgent = await helpers.email_row(
        db, demo.alice, "alice@example.com", priority=9, title="Urgent"
    )
    # The backlog is queued before the urgent one, with nobody consuming yet.
    await _publish_through_the_outbox(settings, db, low)
    await _publish_through_the_outbox(settings, db, [urgent])

    async with email_sender(email_prefetch=1, email_batch_size=1):
        await eventually(
            lambda: _received(smtp, BACKLOG + 1), what="every email", timeout=30
        )

    order = [r.message()["Subject"] for r in smtp.received]
    # With a prefetch of one, at most one low message was already on its way.
    assert "Urgent" in order[:2], order[:5]


async def _received(smtp: SmtpServer, count: int) -> bool:
    return len(smtp.received) >= count


@pytest.mark.parametrize(
    "stop_signal",
    # SIGHUP: the terminal the service runs in closing.
    [signal.SIGTERM, signal.SIGHUP],
    ids=["SIGTERM", "SIGHUP"],
)
async def test_a_stop_signal_finishes_in_flight_deliveries_within_the_drain_time(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    tmp_path: Path,
    stop_signal: signal.Signals,
) -> None:
    smtp.data_delay = 1.0
    notes = [await helpers.email_row(db, demo.bob, "bob@example.com") for _ in range(6)]
    env = {
        "NOTIFLOW_ENV": "test",
        "NOTIFLOW_DATABASE_URL": settings.database_url,
        "NOTIFLOW_AMQP_URL": settings.amqp_url,
        "NOTIFLOW_SMTP_PORT": str(smtp.port),
        "NOTIFLOW_RETRY_DELAYS": "1,2",
        "NOTIFLOW_DRAIN_SECONDS": "4",
    }
    sender = Service("email-sender", env, tmp_path).start()
    try:
        sender.wait_ready()
        await helpers.publish(
            settings.amqp_url, [helpers.delivery(n, demo.bob) for n in notes]
        )
        await eventually(
            lambda: _sending(db, len(notes)), what="all in flight", interval=0.02
        )

        started = time.monotonic()
        assert sender.proc is not None
        os.killpg(sender.proc.pid, stop_signal)
        code = await asyncio.to_thread(sender.proc.wait, 15)
        took = time.monotonic() - started
    finally:
        sender.stop()

    statuses = await db.fetch(
        "SELECT status, count(*) FROM notifications GROUP BY status"
    )
    # uvicorn re-raises the SIGTERM it caught once shutdown is complete.
    assert code in (0, -15), sender.log()
    assert took < 4 + 2, took
    assert dict(statuses) == {"sent": len(notes)}
    assert sorted(smtp.message_ids().values()) == [1] * len(notes)


async def _sending(db: asyncpg.Connection, count: int) -> bool:
    found = await db.fetchval(
        "SELECT count(*) FROM notifications WHERE status = 'sending'"
    )
    return found == count
