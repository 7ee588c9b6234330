"""A stopping consumer finishes what it started and gives back what it had not.

The broker hands a consumer up to its prefetch of messages at once; a batch consumer
holds those no worker has taken yet. Once the service is stopping, none of them may
start: their rows stay ``pending`` and their messages go back to the queue, where
the next consumer takes them on their first attempt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage

from contracts import topology
from contracts.consumer import Item
from contracts.messages import DeliveryBatch, DeliveryRequested
from contracts.runtime import Runtime
from contracts.settings import Settings
from email_sender.app import BATCH_WORKERS
from tests.integration import helpers
from tests.integration.conftest import EmailSenderFactory
from tests.support.data import Demo
from tests.support.smtp import SmtpServer
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

QUEUE = topology.delivery_queue("email")
DELIVERIES = 3 * BATCH_WORKERS

# An SMTP conversation as long as a real server may hold one, within the drain time.
SLOW = {
    "email_batch_size": 1,
    "email_prefetch": DELIVERIES,
    "smtp_timeout": 10,
    "email_lease_seconds": 60,
    "drain_seconds": 10,
}


async def test_a_stopping_email_sender_gives_back_the_deliveries_it_has_not_started(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    smtp.data_delay = 2.0
    rows = [
        await helpers.email_row(db, demo.bob, "bob@example.com")
        for _ in range(DELIVERIES)
    ]
    await helpers.publish(
        settings.amqp_url, [helpers.delivery(n, demo.bob) for n in rows]
    )

    async with email_sender(**SLOW):
        # One email per worker is on its way; the broker has handed over the rest,
        # which wait for a worker.
        await eventually(
            lambda: _statuses_are(
                db, {"sending": BATCH_WORKERS, "pending": DELIVERIES - BATCH_WORKERS}
            ),
            what="every worker sending",
            interval=0.02,
        )
        await eventually(lambda: _ready(settings, 0), what="every message delivered")

    waiting = DELIVERIES - BATCH_WORKERS
    assert await _statuses(db) == {"sent": BATCH_WORKERS, "pending": waiting}
    assert await _ready(settings, waiting)
    assert len(smtp.received) == BATCH_WORKERS

    smtp.data_delay = 0
    async with email_sender(**SLOW):
        await eventually(
            lambda: _statuses_are(db, {"sent": DELIVERIES}), what="every email sent"
        )
    attempts = await db.fetch(
        "SELECT attempts, count(*) FROM notifications GROUP BY attempts"
    )
    assert dict(attempts) == {1: DELIVERIES}
    assert sorted(smtp.message_ids().values()) == [1] * DELIVERIES


async def test_a_batch_still_running_at_the_drain_limit_is_reported_and_given_back(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    smtp.data_delay = 6.0
    rows = [await helpers.email_row(db, demo.bob, "bob@example.com") for _ in range(3)]
    await helpers.publish(
        settings.amqp_url, [helpers.delivery(n, demo.bob) for n in rows]
    )

    with caplog.at_level(logging.WARNING, logger="contracts.consumer"):
        async with email_sender(**{**SLOW, "drain_seconds": 1}):
            await eventually(
                lambda: _statuses_are(db, {"sending": 3}),
                what="all three sending",
                interval=0.02,
            )

    # Their emails may have reached the server: the rows stay claimed, and the
    # lease sweeper hands them out again once the lease has run out.
    assert await _statuses(db) == {"sending": 3}
    assert await _ready(settings, 3)
    [report] = [
        r for r in caplog.records if getattr(r, "action", "") == "consumer.abandoned"
    ]
    assert report.levelno == logging.WARNING
    assert report.args == (1.0, "3 messages", QUEUE, "3 items")


async def test_a_handler_still_running_at_the_drain_limit_is_cancelled_and_given_back(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    queue = topology.delivery_queue("push")
    await helpers.publish(
        settings.amqp_url,
        [helpers.delivery(1, 1, channel_type="push")],
        routing_key="push",
    )
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(payload: DeliveryRequested, raw: AbstractIncomingMessage) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    quick = settings.model_copy(update={"drain_seconds": 0.5})
    runtime = Runtime(quick, consumers=True)
    runtime.subscribe(queue, DeliveryRequested, handler, prefetch=10, action="test")
    await runtime.start()
    try:
        await asyncio.wait_for(started.wait(), 20)
    finally:
        with caplog.at_level(logging.WARNING, logger="contracts.consumer"):
            await runtime.stop()

    assert cancelled.is_set()
    assert (await helpers.depths(settings.amqp_url, queue))[queue] == 1
    [report] = [
        r for r in caplog.records if getattr(r, "action", "") == "consumer.abandoned"
    ]
    assert report.args == (0.5, "1 message", queue, "each alone")


async def _statuses(db: asyncpg.Connection) -> dict[str, int]:
    found = await db.fetch("SELECT status, count(*) FROM notifications GROUP BY status")
    return dict(found)


async def _statuses_are(db: asyncpg.Connection, expected: dict[str, int]) -> bool:
    return await _statuses(db) == expected


async def _ready(settings: Settings, count: int) -> bool:
    return (await helpers.depths(settings.amqp_url, QUEUE))[QUEUE] == count


async def test_the_drain_report_counts_only_the_items_a_batch_still_holds(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    queue = topology.delivery_queue("push")
    # One message of four deliveries, so that they make one batch.
    together = DeliveryBatch(
        deliveries=[
            DeliveryRequested.model_validate_json(
                helpers.delivery(n, 1, channel_type="push")
            )
            for n in range(1, 5)
        ]
    )
    await helpers.publish(settings.amqp_url, [together.to_bytes()], routing_key="push")
    settled: list[int] = []
    stuck = asyncio.Event()

    async def handler(items: Sequence[Item[DeliveryRequested]]) -> list[None]:
        # Three settled at once; the fourth waits past the drain, holding the
        # batch it came in.
        numbers = [item.message.notification_id for item in items]
        for item, number in zip(items, numbers, strict=True):
            if number != 4:
                item.finished()
                settled.append(number)
        if 4 in numbers:
            stuck.set()
            await asyncio.Event().wait()
        return [None] * len(items)

    quick = settings.model_copy(update={"drain_seconds": 0.5})
    runtime = Runtime(quick, consumers=True)
    runtime.subscribe_batch(
        queue,
        DeliveryRequested,
        handler,
        prefetch=10,
        max_batch=4,
        action="test",
        envelope=DeliveryBatch,
    )
    await runtime.start()
    try:
        await asyncio.wait_for(stuck.wait(), 20)
        await eventually(lambda: _all_of(settled, 3), what="three settled")
    finally:
        with caplog.at_level(logging.WARNING, logger="contracts.consumer"):
            await runtime.stop()

    [report] = [
        r for r in caplog.records if getattr(r, "action", "") == "consumer.abandoned"
    ]
    assert report.args == (0.5, "1 message", queue, "1 item")
    assert (await helpers.depths(settings.amqp_url, queue))[queue] == 1


async def _all_of(settled: list[int], count: int) -> bool:
    return len(settled) == count
