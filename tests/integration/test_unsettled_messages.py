"""A message whose retry or dead letter cannot be published goes back to its
queue, instead of staying unacknowledged on a channel that lives on."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest
from aio_pika.abc import AbstractIncomingMessage

from contracts import topology
from contracts.consumer import DeadLetter, Publisher, RetryLater
from contracts.messages import DeliveryRequested
from contracts.runtime import Runtime
from contracts.settings import Settings
from tests.integration import helpers
from tests.support import infra
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


async def test_dead_letters_go_out_on_a_new_channel_once_the_broker_takes_them(
    settings: Settings,
) -> None:
    # A refused publish makes the broker close the channel it came on; aio-pika
    # tries once to open it again, while the refusal holds, and then leaves it
    # closed. The service must publish on a new one once it may.
    queue = topology.delivery_queue("push")
    vhost = urlsplit(settings.amqp_url).path.lstrip("/")
    handled: list[int] = []

    async def handler(payload: DeliveryRequested, raw: AbstractIncomingMessage) -> None:
        handled.append(1)
        raise DeadLetter("set aside on purpose")

    runtime = Runtime(settings, consumers=True)
    runtime.subscribe(queue, DeliveryRequested, handler, prefetch=10, action="test")
    await runtime.start()
    try:
        # Anything may be written to but the dead letters' exchange and queue.
        _write_permission(vhost, "^(?!notiflow\\.dead-letters).*")
        try:
            await helpers.publish(
                settings.amqp_url,
                [helpers.delivery(1, 1, channel_type="push")],
                routing_key="push",
                declare=False,
            )
            await eventually(
                lambda: _at_least(handled, 2),
                what="the message tried twice",
                timeout=30,
            )
        finally:
            _write_permission(vhost, ".*")
        letters: list[object] = []

        async def dead_lettered() -> bool:
            letters.extend(await helpers.take_dead_letters(settings.amqp_url))
            return bool(letters)

        await eventually(dead_lettered, what="the dead letter", timeout=30)
        depth = await helpers.depths(settings.amqp_url, queue)
    finally:
        await runtime.stop()

    assert len(letters) == 1
    assert helpers.reason(letters[0]) == "set aside on purpose"  # type: ignore[arg-type]
    assert depth[queue] == 0


def _write_permission(vhost: str, pattern: str) -> None:
    infra._rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", pattern, ".*")


async def _at_least(items: list[int], count: int) -> bool:
    await asyncio.sleep(0)
    return len(items) >= count
