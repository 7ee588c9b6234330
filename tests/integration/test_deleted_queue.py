"""A queue deleted while its service runs comes back, and the service consumes it.

Deleting a queue, by hand or with a lost broker node, makes the broker cancel its
consumers and drop what is routed to it meanwhile. The service declares the queue
again, subscribes once more and is ready; what is published from then on arrives.
"""

from __future__ import annotations

import logging

import aio_pika
import asyncpg
import pytest

from contracts import topology
from contracts.settings import Settings
from tests.integration import helpers
from tests.integration.conftest import EmailSenderFactory
from tests.support.data import Demo
from tests.support.smtp import SmtpServer
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

QUEUE = topology.delivery_queue("email")


async def _consumers(amqp_url: str, queue: str) -> int | None:
    """How many consumers ``queue`` has; None while it does not exist."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return None
        return declared.declaration_result.consumer_count


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
    return await _consumers(amqp_url, QUEUE) == 1


async def _status_is(db: asyncpg.Connection, notification: int, status: str) -> bool:
    return (await helpers.row(db, notification))["status"] == status
