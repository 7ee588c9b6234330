"""Batch consumption on a real broker: messages gather into batches, and each one
still ends on its own (acked, parked for a retry, or dead-lettered with its reason)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence

import pytest

from contracts import consumer, topology
from contracts.consumer import DeadLetter, Item, RetryLater
from contracts.db import DatabaseUnavailable
from contracts.logs import bound
from contracts.messages import DeliveryBatch, DeliveryRequested
from contracts.runtime import Runtime
from contracts.settings import Settings
from tests.integration import helpers
from tests.integration.helpers import (
    body,
    depths,
    publish,
    reason,
    take_dead_letters,
)
from tests.support.waiting import eventually

QUEUE = topology.delivery_queue("push")


def delivery(notification_id: int, user_id: int) -> bytes:
    return helpers.delivery(notification_id, user_id, channel_type="push")


async def _run(
    settings: Settings,
    handler,
    *,
    max_batch: int,
    workers: int = 1,
    envelope=None,
    **options,
):
    runtime = Runtime(settings, consumers=True)
    runtime.subscribe_batch(
        QUEUE,
        DeliveryRequested,
        handler,
        prefetch=100,
        max_batch=max_batch,
        workers=workers,
        action="test",
        envelope=envelope,
        **options,
    )
    await runtime.start()
    return runtime


async def test_waiting_messages_are_handled_together_and_each_acked(
    settings: Settings,
) -> None:
    await publish(
        settings.amqp_url, [delivery(i, 1) for i in range(1, 41)], routing_key="push"
    )
    batches: list[list[int]] = []

    async def handler(items: Sequence[Item[DeliveryRequested]]) -> list[None]:
        batches.append([item.message.notification_id for item in items])
        await asyncio.sleep(0.05)
        return [None] * len(items)

    runtime = await _run(settings, handler, max_batch=16)
    try:
        await eventually(lambda: _handled(batches, 40), what="every message handled")
        assert max(len(batch) for batch in batches) > 1, batches
        assert all(len(batch) <= 16 for batch in batches), batches
        assert sorted(n for batch in batches for n in batch) == list(range(1, 41))

        async def drained() -> bool:
            return (await depths(settings.amqp_url, QUEUE))[QUEUE] == 0

        await eventually(drained, what="queue empty")
    finally:
        await runtime.stop()
    # Acked, not merely delivered: nothing comes back after the consumer is gone.
    assert (await depths(settings.amqp_url, QUEUE))[QUEUE] == 0
    assert await take_dead_letters(settings.amqp_url) == []


async def test_a_batch_waiting_on_one_slow_item_does_not_hold_back_the_rest(
    settings: Settings,
) -> None:
    # Message 1 waits on a peer that answers late; its batch settles the others as
    # they are done. With one worker, everything else must still be handled and
    # acked meanwhile: message 2 of its own batch, and all published after it.
    release = asyncio.Event()
    handled: list[int] = []
    batches: list[list[int]] = []

    async def one(item: Item[DeliveryRequested]) -> None:
        if item.message.notification_id == 1:
            await release.wait()
        handled.append(item.message.notification_id)
        item.finished()

    async def handler(items: Sequence[Item[DeliveryRequested]]) -> list[None]:
        batches.append([item.message.notification_id for item in items])
        await asyncio.gather(*(one(item) for item in items))
        return [None] * len(items)

    def acked() -> float:
        return helpers.counted(
            "notiflow_messages_handled", queue=QUEUE, outcome="acked"
        )

    await publish(
        settings.amqp_url, [delivery(1, 1), delivery(2, 1)], routing_key="push"
    )
    before = acked()
    runtime = await _run(
        settings, handler, max_batch=4, workers=1, max_items=8, slow_after=0.2
    )
    try:
        await eventually(lambda: _count(handled, 1), what="message 2 handled")
        assert batches[0] == [1, 2]
        await publish(
            settings.amqp_url,
            [delivery(i, 1) for i in range(3, 31)],
            routing_key="push",
        )
        await eventually(
            lambda: _count(handled, 29), what="all but the slow one handled"
        )

        async def acked_all_but_one() -> bool:
            return acked() - before == 29

        await eventually(acked_all_but_one, what="every message but the slow one acked")
        assert 1 not in handled
        release.set()
        await eventually(lambda: _count(handled, 30), what="the slow one handled")
    finally:
        release.set()
        await runtime.stop()
    assert sorted(handled) == list(range(1, 31))
    assert (await depths(settings.amqp_url, QUEUE))[QUEUE] == 0


async def test_without_slow_after_a_slow_batch_keeps_its_worker(
    settings: Settings,
) -> None:
    release = asyncio.Event()
    handled: list[int] = []

    async def handler(items: Sequence[Item[DeliveryRequested]]) -> list[None]:
        numbers = [item.message.notification_id for item in items]
        if 1 in numbers:
            await release.wait()
        handled.extend(numbers)
        return [None] * len(items)

    runtime = await _run(settings, handler, max_batch=4, workers=1)
    try:
        await publish(settings.amqp_url, [delivery(1, 1)], routing_key="push")
        await asyncio.sleep(0.3)
        await publish(settings.amqp_url, [delivery(2, 1)], routing_key="push")
        await asyncio.sleep(0.5)
        # The one worker is the slow batch's: message 2 waits for it.
        assert handled == []
        release.set()
        await eventually(lambda: _count(handled, 2), what="both handled")
    finally:
        release.set()
        await runtime.stop()


async def _handled(batches: list[list[int]], count: int) -> bool:
    return sum(len(batch) for batch in batches) >= count


async def test_each_message_of_a_batch_ends_its_own_way(settings: Settings) -> None:
    await publish(
        settings.amqp_url, [delivery(i, 1) for i in range(1, 7)], routing_key="push"
    )
    seen: list[int] = []

    async def handler(
        items: Sequence[Item[DeliveryRequested]],
    ) -> list[Exception | None]:
        outcomes: list[Exception | None] = []
        for item in items:
            number = item.message.notification_id
            seen.append(number)
            if number == 2:
                outcomes.append(DeadLetter("recipient 2 is gone"))
            elif number == 3:
                outcomes.append(RetryLater("server busy", 1))
            else:
                outcomes.append(None)
        return outcomes

    runtime = await _run(settings, handler, max_batch=10)
    try:
        await eventually(lambda: _count(seen, 6), what="six messages handled")
        dead = await eventually(
            lambda: take_dead_letters(settings.amqp_url), what="a dead letter"
        )
        # Number 3 went to the one-second delay queue and comes back for a second try.
        await eventually(
            lambda: _count([n for n in seen if n == 3], 2), what="number 3 again"
        )
    finally:
        await runtime.stop()
    assert [body(m)["notification_id"] for m in dead] == [2]
    assert reason(dead[0]) == "recipient 2 is gone"
    assert seen.count(1) == 1 and seen.count(4) == 1


async def _count(seen: list[int], count: int) -> bool:
    return len(seen) >= count


async def test_a_message_that_breaks_its_batch_is_the_only_one_dead_lettered(
    settings: Settings,
) -> None:
    await publish(
        settings.amqp_url, [delivery(i, 1) for i in range(1, 9)], routing_key="push"
    )
    done: list[int] = []

    async def handler(items: Sequence[Item[DeliveryRequested]]) -> list[None]:
        numbers = [item.message.notification_id for item in items]
        if 5 in numbers:
            raise ValueError("cannot handle number 5")
        done.extend(numbers)
        return [None] * len(items)

    runtime = await _run(settings, handler, max_batch=8)
    try:
        await eventually(lambda: _count(done, 7), what="the other seven handled")
        dead = await eventually(
            lambda: take_dead_letters(settings.amqp_url), what="a dead letter"
        )
    finally:
        await runtime.stop()
    assert sorted(done) == [1, 2, 3, 4, 6, 7, 8]
    assert [body(m)["notification_id"] for m in dead] == [5]
    assert "cannot handle number 5" in reason(dead[0])


async def test_a_batch_waits_out_a_database_outage_and_loses_nothing(
    settings: Settings,
) -> None:
    await publish(
        settings.amqp_url, [delivery(i, 1) for i in range(1, 5)], routing_key="push"
    )
    failures = 2
    done: list[int] = []

    async def handler(items: Sequence[Item[DeliveryRequested]]) -> list[None]:
        nonlocal failures
        if failures:
            failures -= 1
            raise DatabaseUnavailable("database is away")
        done.extend(item.message.notification_id for item in items)
        return [None] * len(items)

    runtime = await _run(settings, handler, max_batch=8)
    try:
        await eventually(lambda: _count(done, 4), what="all four handled")
    finally:
        await runtime.stop()
    assert sorted(done) == [1, 2, 3, 4]
    assert await take_dead_letters(settings.amqp_url) == []


async def test_items_carry_the_log_ids_of_their_own_message(
    settings: Settings,
) -> None:
    await publish(
        settings.amqp_url, [delivery(i, 1) for i in (11, 12)], routing_key="push"
    )
    fields: dict[int, dict] = {}

    async def handler(items: Sequence[Item[DeliveryRequested]]) -> list[None]:
        for item in items:
            fields[item.message.notification_id] = item.within(bound)
        return [None] * len(items)

    runtime = await _run(settings, handler, max_batch=8)
    try:
        await eventually(lambda: _count(list(fields), 2), what="both handled")
    finally:
        await runtime.stop()
    assert fields[11]["notification_id"] == "11"
    assert fields[12]["notification_id"] == "12"


def test_a_batch_consumer_needs_room_for_one_message() -> None:
    runtime = Runtime(Settings(), consumers=True)

    async def handler(items: Sequence[Item[DeliveryRequested]]) -> list[None]:
        return [None] * len(items)

    with pytest.raises(ValueError, match="max_batch"):
        runtime.subscribe_batch(
            QUEUE, DeliveryRequested, handler, prefetch=1, max_batch=0, action="t"
        )


def _envelope(*numbers: int) -> bytes:
    return DeliveryBatch(
        deliveries=[
            DeliveryRequested.model_validate_json(delivery(n, 1)) for n in numbers
        ]
    ).to_bytes()


def _setting_aside(
    seen: list[int], *, dead: int, later: int
) -> Callable[[Sequence[Item[DeliveryRequested]]], Awaitable[list[Exception | None]]]:
    """A handler that dead-letters delivery ``dead``, parks ``later`` for a second
    the first time, and takes the rest; it notes each number it is given."""

    async def handler(
        items: Sequence[Item[DeliveryRequested]],
    ) -> list[Exception | None]:
        outcomes: list[Exception | None] = []
        for item in items:
            number = item.message.notification_id
            seen.append(number)
            if number == dead:
                outcomes.append(DeadLetter(f"recipient {dead} is gone"))
            elif number == later and seen.count(later) == 1:
                outcomes.append(RetryLater("server busy", 1))
            else:
                outcomes.append(None)
        return outcomes

    return handler


async def test_an_envelope_item_that_fails_goes_on_alone(settings: Settings) -> None:
    await publish(settings.amqp_url, [_envelope(1, 2, 3, 4)], routing_key="push")
    seen: list[int] = []
    handler = _setting_aside(seen, dead=2, later=3)

    runtime = Runtime(settings, consumers=True)
    runtime.subscribe_batch(
        QUEUE,
        DeliveryRequested,
        handler,
        prefetch=10,
        max_batch=10,
        action="test",
        envelope=DeliveryBatch,
    )
    await runtime.start()
    try:
        dead = await eventually(
            lambda: take_dead_letters(settings.amqp_url), what="a dead letter"
        )
        await eventually(
            lambda: _count([n for n in seen if n == 3], 2), what="number 3 again"
        )
    finally:
        await runtime.stop()
    # The dead letter and the retry are each the one failed delivery, not the
    # envelope, so that replaying them repeats nothing else.
    assert len(dead) == 1
    assert body(dead[0])["notification_id"] == 2
    assert "deliveries" not in body(dead[0])
    assert dead[0].message_id == "notification-2"
    assert reason(dead[0]) == "recipient 2 is gone"
    assert sorted(seen) == [1, 2, 3, 3, 4]


async def test_a_single_handler_is_called_once_per_envelope_item(
    settings: Settings,
) -> None:
    await publish(
        settings.amqp_url,
        [_envelope(5, 6, 7), delivery(8, 1)],
        routing_key="push",
    )
    seen: list[tuple[int, str]] = []

    async def handler(message: DeliveryRequested, _raw: object) -> None:
        seen.append((message.notification_id, bound()["notification_id"]))

    runtime = Runtime(settings, consumers=True)
    runtime.subscribe(
        QUEUE,
        DeliveryRequested,
        handler,
        prefetch=10,
        action="test",
        envelope=DeliveryBatch,
    )
    await runtime.start()
    try:
        await eventually(lambda: _count(seen, 4), what="four deliveries handled")

        async def drained() -> bool:
            return (await depths(settings.amqp_url, QUEUE))[QUEUE] == 0

        await eventually(drained, what="queue empty")
    finally:
        await runtime.stop()
    assert sorted(seen) == [(5, "5"), (6, "6"), (7, "7"), (8, "8")]


async def test_a_bad_item_in_an_envelope_is_set_aside_and_the_rest_handled(
    settings: Settings,
) -> None:
    good = [json.loads(delivery(n, 1)) for n in (21, 23)]
    bad = {"schema_version": "1.0", "notification_id": "nope"}
    envelope = {"schema_version": "1.0", "deliveries": [good[0], bad, good[1]]}
    await publish(
        settings.amqp_url, [json.dumps(envelope).encode()], routing_key="push"
    )
    seen: list[int] = []

    async def handler(items: Sequence[Item[DeliveryRequested]]) -> list[None]:
        seen.extend(item.message.notification_id for item in items)
        return [None] * len(items)

    runtime = await _run(settings, handler, max_batch=10, envelope=DeliveryBatch)
    try:
        await eventually(lambda: _count(seen, 2), what="the two good deliveries")
        dead = await eventually(
            lambda: take_dead_letters(settings.amqp_url), what="a dead letter"
        )
    finally:
        await runtime.stop()
    assert sorted(seen) == [21, 23]
    assert [body(m) for m in dead] == [bad]
    assert "item 1 of DeliveryBatch" in reason(dead[0])


async def test_a_body_that_breaks_decoding_unexpectedly_is_set_aside_with_the_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding that raises something other than a bad-message error would raise
    again on every delivery; the message must not sit unacked holding a slot."""
    real = consumer.decode_items

    def decode_items(model, raw, envelope):
        if raw == b'{"breaks": "decoding"}':
            raise KeyError("surprise")
        return real(model, raw, envelope)

    monkeypatch.setattr(consumer, "decode_items", decode_items)
    await publish(
        settings.amqp_url,
        [b'{"breaks": "decoding"}', delivery(7, 1)],
        routing_key="push",
    )
    handled: list[int] = []

    async def handler(items: Sequence[Item[DeliveryRequested]]) -> list[None]:
        handled.extend(item.message.notification_id for item in items)
        return [None] * len(items)

    runtime = await _run(settings, handler, max_batch=4)
    try:
        await eventually(lambda: _handled([handled], 1), what="the next message")
        letters = await eventually(
            lambda: _dead_letters(settings, 1), what="a dead letter"
        )
    finally:
        await runtime.stop()
    assert handled == [7]
    assert [reason(m) for m in letters] == [
        "body could not be decoded: KeyError: 'surprise'"
    ]
    assert (await depths(settings.amqp_url, QUEUE))[QUEUE] == 0


async def test_a_delivery_of_another_channel_type_is_set_aside_not_handled(
    settings: Settings,
) -> None:
    """Its row may well be of the queue's type and already sent: handling it would
    ack a routing mistake as if nothing were wrong."""
    stray = helpers.delivery(5, 1, channel_type="email")
    mixed = DeliveryBatch(
        deliveries=[
            DeliveryRequested.model_validate_json(delivery(6, 1)),
            DeliveryRequested.model_validate_json(
                helpers.delivery(7, 1, channel_type="sse")
            ),
        ]
    ).to_bytes()
    await publish(settings.amqp_url, [stray, mixed], routing_key="push")
    handled: list[int] = []

    async def handler(items: Sequence[Item[DeliveryRequested]]) -> list[None]:
        handled.extend(item.message.notification_id for item in items)
        return [None] * len(items)

    runtime = await _run(settings, handler, max_batch=4, envelope=DeliveryBatch)
    try:
        letters = await eventually(
            lambda: _dead_letters(settings, 2), what="two dead letters"
        )
        await eventually(lambda: _handled([handled], 1), what="the push delivery")
    finally:
        await runtime.stop()
    assert handled == [6]
    assert sorted((body(m)["notification_id"], reason(m)) for m in letters) == [
        (5, "a delivery of type email on the push queue"),
        (7, "a delivery of type sse on the push queue"),
    ]
    assert (await depths(settings.amqp_url, QUEUE))[QUEUE] == 0


async def test_headers_the_client_cannot_write_back_do_not_hold_a_message(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Such a header arrives as bytes, which aio-pika refuses to publish: the
    message could be neither parked nor set aside, and stayed unacked for good."""
    helpers.allow_undecodable(monkeypatch)
    odd = {
        "x-odd": helpers.Undecodable(b"\xff\xfe odd"),
        "traceparent": helpers.Undecodable(b"\xc3\x28"),
        topology.ATTEMPT_HEADER: "abc",
    }
    await publish(
        settings.amqp_url,
        [delivery(1, 1), delivery(2, 1)],
        routing_key="push",
        headers=odd,
    )
    await publish(settings.amqp_url, [delivery(3, 1)], routing_key="push")
    seen: list[int] = []
    handler = _setting_aside(seen, dead=1, later=2)

    runtime = await _run(settings, handler, max_batch=1)
    try:
        # The parked one comes back through the retry queue.
        await eventually(lambda: _handled([seen], 4), what="every message handled")
        (letter,) = await eventually(
            lambda: _dead_letters(settings, 1), what="the dead letter"
        )
        await eventually(
            lambda: _queue_empty(settings), what="nothing left unacked or waiting"
        )
    finally:
        await runtime.stop()
    # Acked, not merely delivered: nothing comes back once the consumer is gone.
    assert await _queue_empty(settings)
    assert sorted(seen) == [1, 2, 2, 3]
    assert reason(letter) == "recipient 1 is gone"
    assert bytes(letter.headers["x-odd"]) == b"\xff\xfe odd"


async def _queue_empty(settings: Settings) -> bool:
    return (await depths(settings.amqp_url, QUEUE))[QUEUE] == 0


async def test_a_dead_letter_whose_headers_cannot_be_written_goes_with_ours_alone(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last resort, for a header no conversion makes writable."""
    helpers.allow_undecodable(monkeypatch)
    monkeypatch.setattr(consumer, "sendable_headers", dict)
    odd = {"x-odd": helpers.Undecodable(b"\xff odd")}
    await publish(settings.amqp_url, [delivery(1, 1)], routing_key="push", headers=odd)
    seen: list[int] = []
    runtime = await _run(settings, _setting_aside(seen, dead=1, later=0), max_batch=1)
    try:
        (letter,) = await eventually(
            lambda: _dead_letters(settings, 1), what="the dead letter"
        )
    finally:
        await runtime.stop()
    assert await _queue_empty(settings)
    assert reason(letter).startswith("recipient 1 is gone (its other headers were")
    assert "x-odd" not in letter.headers
    assert letter.headers[topology.ORIGIN_QUEUE_HEADER] == QUEUE


async def _dead_letters(settings: Settings, count: int) -> list | None:
    """The dead letters, taken from their queue, once there are ``count``."""
    found = await depths(settings.amqp_url, topology.DEAD_LETTER_QUEUE)
    if found[topology.DEAD_LETTER_QUEUE] < count:
        return None
    return await take_dead_letters(settings.amqp_url)
