"""A queue deleted while the services run comes back, and nothing meant for it is
lost.

Deleting a queue, by hand or with a lost broker node, makes the broker cancel its
consumers, and a message routed to no queue is handed back to its publisher. A
consuming service declares the queue again, subscribes once more and is ready; a
publisher whose message came back declares the topology again and publishes once
more: a comment's event, a dead letter and a retry all reach their queue.
"""

from __future__ import annotations

import logging
from typing import Any

import aio_pika
import asyncpg
import pytest

from comments.app import create_app
from contracts import topology
from contracts.settings import Settings
from tests.integration import helpers
from tests.integration.conftest import EmailSenderFactory, calling
from tests.support.data import Demo
from tests.support.smtp import SmtpServer
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

QUEUE = topology.delivery_queue("email")


async def _declared(amqp_url: str, queue: str) -> Any | None:
    """``queue``'s passive declare (its counts); None while it does not exist."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return None
        return declared.declaration_result


async def _delete(amqp_url: str, queue: str) -> None:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)


async def test_an_email_sender_consumes_again_from_its_queue_after_it_was_deleted(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="contracts.consumer"):
        async with email_sender() as app:
            runtime = app.state.runtime
            assert await runtime.readiness() == {}

            await _delete(settings.amqp_url, QUEUE)
            await eventually(
                lambda: _ready_again(settings.amqp_url),
                what="the queue declared again and consumed",
            )

            notification = await helpers.email_row(db, demo.bob, "bob@example.com")
            await helpers.publish(
                settings.amqp_url, [helpers.delivery(notification, demo.bob)]
            )
            await eventually(
                lambda: _status_is(db, notification, "sent"), what="the email sent"
            )
            assert await runtime.readiness() == {}

    assert [m.rcpt_tos for m in smtp.received] == [("bob@example.com",)]
    [resumed] = [
        r for r in caplog.records if getattr(r, "action", "") == "consumer.resumed"
    ]
    assert resumed.queue == QUEUE


async def _ready_again(amqp_url: str) -> bool:
    declared = await _declared(amqp_url, QUEUE)
    return declared is not None and declared.consumer_count == 1


async def _status_is(db: asyncpg.Connection, notification: int, status: str) -> bool:
    return (await helpers.row(db, notification))["status"] == status


async def test_a_comment_posted_while_the_dispatcher_queue_is_gone_keeps_its_event(
    settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    async with calling(create_app(settings), settings, demo.carol, "carol") as api:
        # No dispatcher runs: only the comments service's own relay can bring
        # the queue back.
        await _delete(settings.amqp_url, topology.DISPATCHER_QUEUE)
        posted = await api.post(
            "/comments", json={"post_id": demo.post, "body": "still heard"}
        )
        assert posted.status_code == 201, posted.text
        await eventually(
            lambda: _waiting(settings.amqp_url, topology.DISPATCHER_QUEUE, 1),
            what="the event in the dispatcher's queue, declared again",
        )
        await eventually(
            lambda: _outbox_empty(db), what="the outbox row deleted once confirmed"
        )

    [event] = await _take(settings.amqp_url, topology.DISPATCHER_QUEUE)
    assert event.message_id == posted.json()["event_id"]


async def test_a_dead_letter_set_aside_after_its_queue_was_deleted_is_kept(
    settings: Settings, email_sender: EmailSenderFactory
) -> None:
    async with email_sender():
        await _delete(settings.amqp_url, topology.DEAD_LETTER_QUEUE)
        await helpers.publish(settings.amqp_url, [b"{not json"], declare=False)

        await eventually(
            lambda: _waiting(settings.amqp_url, topology.DEAD_LETTER_QUEUE, 1),
            what="the dead letter in the dead-letter queue, declared again",
        )

    [letter] = await helpers.take_dead_letters(settings.amqp_url)
    assert letter.body == b"{not json"
    assert helpers.reason(letter)


async def test_a_retry_parked_after_its_delay_queue_was_deleted_comes_back(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    smtp.then("tempfail")
    notification = await helpers.email_row(db, demo.bob, "bob@example.com")
    # Sweeps far apart: only the parked message itself can bring the email back.
    async with email_sender(email_sweep_seconds=600, email_lease_seconds=600):
        await _delete(settings.amqp_url, topology.RetryLevel(1).queue)
        await helpers.publish(
            settings.amqp_url,
            [helpers.delivery(notification, demo.bob)],
            declare=False,
        )
        await eventually(
            lambda: _status_is(db, notification, "sent"),
            what="the email sent on its second attempt",
        )

    row = await helpers.row(db, notification)
    assert row["attempts"] == 2
    assert [m.rcpt_tos for m in smtp.received] == [("bob@example.com",)]


async def _waiting(amqp_url: str, queue: str, count: int) -> bool:
    declared = await _declared(amqp_url, queue)
    return declared is not None and declared.message_count == count


async def _take(amqp_url: str, queue: str) -> list[aio_pika.abc.AbstractMessage]:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        source = await channel.declare_queue(queue, passive=True)
        taken = []
        while (message := await source.get(fail=False)) is not None:
            await message.ack()
            taken.append(message)
        return taken


async def _outbox_empty(db: asyncpg.Connection) -> bool:
    return await db.fetchval("SELECT count(*) FROM outbox") == 0


async def test_a_consumer_that_takes_nothing_while_its_queue_fills_is_restarted(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Deliveries the client lets fall, unacknowledged, as the client does for a
    # consumer it no longer knows of: the broker counts the prefetch as in hand,
    # and the queue behind it fills while nothing is handled.
    with caplog.at_level(logging.WARNING, logger="contracts"):
        async with email_sender(email_prefetch=2, email_batch_size=1) as app:
            runtime = app.state.runtime
            subscriber = runtime.consumers._subscribers[QUEUE]
            channel = await subscriber._queue_obj.channel.get_underlay_channel()

            async def dropped(message: Any) -> None:
                return None

            channel.consumers[subscriber._consumer_tag] = dropped
            rows = [
                await helpers.email_row(db, demo.bob, "bob@example.com")
                for _ in range(5)
            ]
            await helpers.publish(
                settings.amqp_url, [helpers.delivery(row, demo.bob) for row in rows]
            )

            for row in rows:
                await eventually(
                    lambda r=row: _status_is(db, r, "sent"),
                    timeout=60,
                    what=f"email {row} sent",
                )
            assert await runtime.readiness() == {}

    assert len(smtp.received) == 5
    [restarted] = [
        r for r in caplog.records if getattr(r, "action", "") == "consumer.restarted"
    ]
    assert restarted.queue == QUEUE
    assert "3 messages waiting" in restarted.getMessage()
