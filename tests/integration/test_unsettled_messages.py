"""A message whose retry or dead letter cannot be published goes back to its
queue, instead of staying unacknowledged on a channel that lives on."""

from __future__ import annotations

import asyncio

import pytest
from aio_pika.abc import AbstractIncomingMessage

from contracts import topology
from contracts.consumer import Publisher, RetryLater
from contracts.messages import DeliveryRequested
from contracts.runtime import Runtime
from contracts.settings import Settings
from tests.integration import helpers
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


async def test_a_message_whose_retry_cannot_be_published_comes_back_at_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = topology.delivery_queue("push")
    await helpers.publish(
        settings.amqp_url,
        [helpers.delivery(1, 1, channel_type="push")],
        routing_key="push",
    )
    real_retry = Publisher.retry
    publishes: list[str] = []

    async def retry_timing_out(self: Publisher, *args: object, **kw: object) -> None:
        # The first retry's publish times out, as under broker flow control.
        publishes.append("retry")
        if len(publishes) == 1:
            raise TimeoutError
        await real_retry(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Publisher, "retry", retry_timing_out)
    handled: list[bool] = []

    async def handler(payload: DeliveryRequested, raw: AbstractIncomingMessage) -> None:
        handled.append(bool(raw.redelivered))
        if len(handled) == 1:
            raise RetryLater("the push service is busy", 5)

    runtime = Runtime(settings, consumers=True)
    runtime.subscribe(queue, DeliveryRequested, handler, prefetch=10, action="test")
    await runtime.start()
    try:

        async def twice() -> bool:
            await asyncio.sleep(0)
            return len(handled) == 2

        await eventually(twice, what="the message handed out again", timeout=20)
        depth = await helpers.depths(settings.amqp_url, queue)
    finally:
        await runtime.stop()

    # Handed out again while the consumer's channel stayed open, and done.
    assert handled == [False, True]
    assert publishes == ["retry"]
    assert depth[queue] == 0
