"""A pending notification whose message RabbitMQ lost is published again.

The delivery queues are classic and not replicated: a lost node, a queue deleted
and declared again, or a purge loses the messages of rows still ``pending``. The
lease sweeper publishes a fresh delivery for a row pending longer than
``NOTIFLOW_PENDING_REPUBLISH_SECONDS``, at most once per that period, and several
sweepers never publish the same row twice between them.

Rows are made old by moving their timestamps back, instead of waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aio_pika
import asyncpg
import pytest

from contracts import topology
from contracts.db import create_pool
from contracts.recovery import (
    LeaseSweeper,
    Swept,
    republish_pending,
    requeue_failed,
)
from contracts.settings import Settings
from contracts.transitions import claim_many_sql
from tests.integration import helpers
from tests.integration.conftest import EmailSenderFactory
from tests.support.data import Demo
from tests.support.smtp import SmtpServer
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

EMAIL_QUEUE = topology.delivery_queue("email")


def _handled() -> float:
    """Messages taken from the email queue so far, however they ended."""
    return helpers.counted("notiflow_messages_handled", queue=EMAIL_QUEUE)


def _republished() -> float:
    return helpers.counted("notiflow_deliveries_recovered", how="republished")


# The age the sweepers of these tests wait for, in seconds.
AGE = 60.0

NOTHING = Swept(recovered=0, failed=0, republished=0)


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


def sweeper(pool: asyncpg.Pool, types: tuple[str, ...] = ("email",)) -> LeaseSweeper:
    """A sweeper that runs only when a test calls its ``sweep``."""
    return LeaseSweeper(
        pool,
        types,
        interval=3600,
        grace_seconds=3,
        max_attempts=3,
        pending_age_seconds=AGE,
    )


async def pending_for(db: asyncpg.Connection, note: int, seconds: float) -> None:
    """Make ``note`` look as if it had been waiting for ``seconds``."""
    await db.execute(
        "UPDATE notifications SET created_at = now() - make_interval(secs => $2), "
        "updated_at = now() - make_interval(secs => $2) WHERE id = $1",
        note,
        seconds,
    )


async def outbox(db: asyncpg.Connection) -> list[str]:
    """The message ids waiting in the outbox, in order."""
    rows = await db.fetch("SELECT message_id FROM outbox ORDER BY id")
    return [row["message_id"] for row in rows]


async def purge(amqp_url: str, queue_name: str) -> None:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        await queue.purge(timeout=10)


async def _sent(db: asyncpg.Connection, note: int) -> dict | None:
    row = await helpers.row(db, note)
    return row if row["status"] == "sent" else None


async def test_a_pending_row_whose_message_was_purged_is_sent_by_the_email_sender(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    note = await helpers.email_row(db, demo.bob, "bob@example.com")
    await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])
    await purge(settings.amqp_url, EMAIL_QUEUE)
    assert (await helpers.depths(settings.amqp_url, EMAIL_QUEUE))[EMAIL_QUEUE] == 0
    # Pending for longer than the sender's own sweeper waits, whatever it is set to.
    await pending_for(db, note, settings.pending_republish_seconds + 60)

    counted = _republished()
    with caplog.at_level(logging.WARNING, logger="contracts.recovery"):
        async with email_sender() as app:
            row = await eventually(lambda: _sent(db, note), what="sent")
            republished = app.state.sweeper.republished

    assert _republished() - counted == 1
    assert row["attempts"] == 1
    assert row["republished_at"] is not None
    assert list(smtp.message_ids().values()) == [1]
    assert republished == 1
    [warning] = [
        r for r in caplog.records if getattr(r, "action", "") == "delivery.republished"
    ]
    assert warning.levelno == logging.WARNING
    assert warning.notification_id == note
    assert warning.pending_seconds >= settings.pending_republish_seconds + 60
    assert f"notification {note} pending for " in warning.getMessage()


async def test_a_republished_row_whose_first_message_survived_is_sent_once(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
    pool: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A long backlog, not a loss: the first message is still in the queue when
    # the sweeper publishes another one for the row.
    note = await helpers.email_row(db, demo.bob, "bob@example.com")
    await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])
    await pending_for(db, note, AGE + 30)
    assert (await sweeper(pool).sweep()).republished == 1
    # A slow DATA holds the row ``sending`` while the relay publishes the copy.
    smtp.data_delay = 1.5

    handled = _handled()

    with caplog.at_level(logging.INFO, logger="email_sender.worker"):
        async with email_sender(smtp_timeout=5, email_lease_seconds=30):

            async def both_handled() -> bool:
                return _handled() - handled >= 2

            await eventually(both_handled, what="both messages handled")
            dead = await helpers.take_dead_letters(settings.amqp_url)

    row = await helpers.row(db, note)
    # The copy that came second met the claim of the first (or its outcome).
    [refused] = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().endswith("; nothing to send")
    ]
    assert refused in (
        "notification is sending; nothing to send",
        "notification is sent; nothing to send",
    )
    assert row["status"] == "sent" and row["attempts"] == 1
    assert list(smtp.message_ids().values()) == [1]
    assert len(smtp.received) == 1
    assert dead == []
    assert await outbox(db) == []


async def test_two_claims_of_one_pending_row_let_only_one_worker_through(
    demo: Demo, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    # What makes a duplicate message harmless: of two workers claiming the same
    # row at once, the second waits for the first and then finds nothing to claim.
    note = await helpers.email_row(db, demo.bob, "bob@example.com")
    claim = claim_many_sql("email", "id, attempts")

    async with pool.acquire() as first, first.transaction():
        won = await first.fetch(claim, [note], 30.0)

        second = asyncio.create_task(db.fetch(claim, [note], 30.0))

        async def second_waits() -> bool:
            waiting = await first.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            return waiting == 1

        await eventually(second_waits, interval=0.02, what="the second claim waits")

    lost = await asyncio.wait_for(second, timeout=10)
    assert [(r["id"], r["attempts"]) for r in won] == [(note, 1)]
    assert lost == []
    assert (await helpers.row(db, note))["attempts"] == 1


async def test_a_young_pending_row_is_left_alone(
    demo: Demo, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    fresh = await helpers.email_row(db, demo.bob, "bob@example.com")
    nearly = await helpers.email_row(db, demo.bob, "bob@example.com")
    await pending_for(db, nearly, AGE - 20)
    # Published again a day ago, then failed; an operator has just set it back to
    # pending, with a message of its own: it is young from that moment.
    requeued = await helpers.email_row(db, demo.bob, "bob@example.com")
    await db.execute(
        "UPDATE notifications SET status = 'failed', attempts = 1, "
        "republished_at = now() - interval '1 day' WHERE id = $1",
        requeued,
    )
    await pending_for(db, requeued, 2 * 24 * 3600)
    async with pool.acquire() as conn, conn.transaction():
        since = datetime.now(UTC) - timedelta(days=3)
        assert await requeue_failed(conn, since=since) == [requeued]
    requeue_message = await outbox(db)

    swept = await sweeper(pool).sweep()

    assert swept == NOTHING
    assert await outbox(db) == requeue_message == [f"notification-{requeued}"]
    for note in (fresh, nearly, requeued):
        assert (await helpers.row(db, note))["status"] == "pending"
    assert (await helpers.row(db, fresh))["republished_at"] is None


async def test_a_row_published_again_is_not_published_again_within_the_period(
    demo: Demo,
    db: asyncpg.Connection,
    pool: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    note = await helpers.email_row(db, demo.bob, "bob@example.com")
    await pending_for(db, note, AGE + 30)
    sweeps = sweeper(pool)

    with caplog.at_level(logging.WARNING, logger="contracts.recovery"):
        first = await sweeps.sweep()
        again = [await sweeps.sweep() for _ in range(3)]
    after_first = await helpers.row(db, note)

    assert first.republished == 1
    assert again == [NOTHING] * 3
    assert await outbox(db) == [f"notification-{note}"]
    assert after_first["status"] == "pending"
    assert after_first["republished_at"] is not None
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith(f"notification {note} pending for ")
    assert AGE + 30 <= warning.pending_seconds < AGE + 90

    # A period after the last time: once more, and only once.
    await db.execute(
        "UPDATE notifications SET republished_at = now() - make_interval(secs => $2) "
        "WHERE id = $1",
        note,
        AGE + 1,
    )
    later = [await sweeps.sweep() for _ in range(2)]

    assert [swept.republished for swept in later] == [1, 0]
    assert await outbox(db) == [f"notification-{note}"] * 2
    assert sweeps.republished == 2


async def test_two_sweepers_never_publish_the_same_row(
    settings: Settings, demo: Demo, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    notes = [await helpers.email_row(db, demo.bob, "bob@example.com") for _ in range(6)]
    for note in notes:
        await pending_for(db, note, AGE + 30)
    other = await create_pool(settings, min_size=1, max_size=1)
    try:
        # One sweeper is midway through a sweep that has taken three rows.
        async with other.acquire() as held, held.transaction():
            taken = await republish_pending(held, ["email"], age_seconds=AGE, limit=3)
            meanwhile = await sweeper(pool).sweep()
        after = await sweeper(pool).sweep()

        # And two sweeping at once, over rows pending too long again.
        await db.execute(
            "UPDATE notifications SET republished_at = now() - interval '1 day'"
        )
        await db.execute("DELETE FROM outbox")
        both = await asyncio.gather(sweeper(pool).sweep(), sweeper(other).sweep())
    finally:
        await other.close()

    assert len(taken) == 3
    assert meanwhile.republished == 3, "the other rows, skipping the locked ones"
    assert after == NOTHING
    assert sum(swept.republished for swept in both) == len(notes)
    assert sorted(await outbox(db)) == sorted(f"notification-{n}" for n in notes)


@pytest.mark.parametrize("status", ["sent", "skipped", "failed"])
async def test_a_finished_row_is_never_published_again(
    status: str, demo: Demo, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    note = await helpers.email_row(db, demo.bob, "bob@example.com")
    await db.execute(
        "UPDATE notifications SET status = $2, attempts = 1, "
        "sent_at = CASE WHEN $2 = 'sent' THEN now() END WHERE id = $1",
        note,
        status,
    )
    await pending_for(db, note, 10 * AGE)
    before = await helpers.row(db, note)

    swept = [await sweeper(pool).sweep() for _ in range(2)]

    assert swept == [NOTHING] * 2
    assert await helpers.row(db, note) == before
    assert await outbox(db) == []


async def test_a_sweeper_leaves_pending_rows_of_other_types_to_their_own_sender(
    demo: Demo, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    note = await helpers.email_row(db, demo.bob, "bob@example.com")
    await db.execute("UPDATE notifications SET type = 'sse' WHERE id = $1", note)
    await pending_for(db, note, AGE + 30)

    assert await sweeper(pool, ("email",)).sweep() == NOTHING
    assert await outbox(db) == []
    assert (await sweeper(pool, ("sse",)).sweep()).republished == 1
