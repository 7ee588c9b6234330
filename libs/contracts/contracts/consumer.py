"""How every notiflow consumer treats a message, in one place.

A handler receives the decoded message and either returns (the work is stored; ack),
or raises one of the exceptions below, which say what must happen next::

    Exception
    ├── RetryLater       transient failure: park the message in a delay queue whose
    │                    TTL dead-letters it back to its queue, then ack
    ├── DeadLetter       permanent failure: copy the message to the dead-letter queue
    │                    with the reason in its headers, then ack
    └── contracts.db.DatabaseUnavailable (and asyncpg's connection errors and
                         timeouts: :func:`contracts.db.is_unavailable`)
                         the database is away: keep the message (unacked, so
                         RabbitMQ still owns it) and call the handler again after a
                         growing pause; on shutdown, nack it with requeue

A body that does not parse (:class:`contracts.messages.BadMessage`) is dead-lettered
with the parse error as its reason. Any other exception is a bug in the handler: the
message is dead-lettered with the error, so that one bad message cannot stop the
queue, and an operator can replay it once the bug is fixed.

Why the database case retries in place rather than nacking at once: the dispatcher's
queue is a quorum queue with ``x-delivery-limit``, and every nack with requeue counts
as a delivery there. A database outage longer than a few backoff rounds would push
every waiting event past the limit, into the dead-letter queue. Holding it
costs one prefetch slot per message, which nothing else could use while the database
is away anyway.

Batches. :meth:`Consumers.subscribe_batch` hands a handler every message that is
waiting at once, up to a limit, so that it can claim, write and settle many rows
with a few statements instead of a few statements each. Nothing waits for a batch
to fill: a worker takes whatever has arrived when it becomes free, so one message
on a quiet queue is handled alone and at once, and batches grow only when messages
arrive faster than they are handled. The handler answers each message separately
(done, :class:`RetryLater`, :class:`DeadLetter`), and each message is acked,
parked or set aside on its own, exactly as a single handler's would be.

Stopping (:meth:`Consumers.stop`). The consumers first cancel their subscriptions,
so that the broker delivers nothing more, then hand every message they hold but have
not started back to the broker (nack with requeue): a message waiting in a batcher
for a worker, or one that arrived while the subscription was being cancelled. Its
handler never runs, so nothing it would claim is touched. What has started is let
finish for up to the drain time. A message still being handled then is cancelled and
given back too, and a warning says how many there were: whatever its handler had
claimed (a row ``sending``) stays claimed until its lease runs out, and the lease
sweeper hands it out again; a send cut short may have reached its server, so that
delivery can go out twice.

:meth:`Consumers.missing` says which queues have no live consumer in this process
(a channel that is still reconnecting, or a consumer the broker cancelled because
its queue was deleted); readiness reports them. A reconnecting channel consumes again
by itself once it is back; a cancelled consumer does not, so :meth:`Consumers.resume`
subscribes it again once its queue has been declared again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, ParamSpec, TypeVar, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from faststream import AckPolicy
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage
from opentelemetry.trace import SpanKind

from contracts import metrics, topology, tracing
from contracts.db import is_unavailable
from contracts.logs import bind
from contracts.messages import BadMessage, Envelope, Message, Part, decode_items

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
P = ParamSpec("P")
T = TypeVar("T")

# When the message was set aside, for ``notiflow-admin dlq list``.
DEAD_LETTERED_AT_HEADER = "x-notiflow-dead-lettered-at"

# Seconds a stopping consumer waits for the broker to confirm a cancelled
# subscription, and for cancelled handlers to give their messages back.
UNSUBSCRIBE_SECONDS = 5
ABANDON_SECONDS = 5


# How long handing back a message that could not be settled may take.
RETURN_SECONDS = 5.0


class RetryLater(Exception):
    """Try again after ``delay_seconds``; must be one of the configured retry delays."""

    def __init__(self, reason: str, delay_seconds: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay_seconds = delay_seconds


class DeadLetter(Exception):
    """Give up on this message; an operator may replay it from the dead-letter queue.

    ``row_failed`` says the handler has marked the message's notification row
    ``failed``: the dead letter then carries :data:`topology.ROW_FAILED_HEADER`, so
    that the operator's tools can say that replaying it sends nothing.
    """

    def __init__(self, reason: str, *, row_failed: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.row_failed = row_failed


Handler = Callable[[M, AbstractIncomingMessage], Awaitable[None]]


@dataclass(eq=False)
class Item(Generic[M]):
    """One message of a batch, with the context its own consumer runs in."""

    message: M
    raw: AbstractIncomingMessage
    context: contextvars.Context
    # Given by the batcher: settle the item as handled, or as failed, before its
    # batch returns.
    _finish: Callable[[], None] | None = field(default=None, repr=False)
    _fail: Callable[[Exception], None] | None = field(default=None, repr=False)

    def within(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``fn`` as if inside this message's consumer: its log ids, its trace."""
        return self.context.run(fn, *args, **kwargs)

    def finished(self) -> None:
        """Settle this item as handled now, before its batch returns.

        Its message is acked once every other item of it is settled too, and its
        place counts no more against the batcher's ``max_items``, so one slow item
        does not keep the rest of the queue waiting. Its outcome in the batch's
        answer must then be None; a batch run again (the database away, a failed
        batch handled item by item) may see it again, as a redelivery would.
        """
        if self._finish is not None:
            self._finish()

    def failed(self, outcome: RetryLater | DeadLetter) -> None:
        """Settle this item now as ``outcome``, before its batch returns.

        Its retry is published, or its dead letter, as for an outcome in the
        batch's answer, but without waiting for the batch's slowest item: a retry's
        delay runs from the failure. As with :meth:`finished`, its outcome in the
        answer must then be None.
        """
        if self._fail is not None:
            self._fail(outcome)


# Returns one outcome per item, in order: None (done), or the RetryLater or
# DeadLetter that says what must happen to that message.
BatchHandler = Callable[[Sequence[Item[M]]], Awaitable[Sequence[Exception | None]]]


class Publisher:
    """A confirming channel for dead letters and retries.

    The channel must be opened with ``on_return_raises``: a message no queue takes
    (its queue was deleted while the service ran) is then refused rather than
    confirmed and dropped. The publisher declares the topology again (``restore``)
    and publishes once more, so the dead letter or retry is kept.

    A channel the broker closed (over a refused publish: an exchange deleted, the
    user's permissions taken away), which aio-pika could not open again, is
    exchanged for a new one (``replace``, given the lost channel) and the message
    published on that.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        restore: Callable[[], Awaitable[None]] | None = None,
        replace: Callable[[AbstractChannel], Awaitable[AbstractChannel]] | None = None,
    ) -> None:
        self._channel = channel
        self._restore = restore
        self._replace = replace

    async def _publish(
        self, exchange_name: str, message: aio_pika.Message, queue: str
    ) -> None:
        try:
            await self._publish_on_channel(exchange_name, message, queue)
        except aiormq.exceptions.ChannelInvalidStateError:
            if self._replace is None:
                raise
            self._channel = await self._replace(self._channel)
            await self._publish_on_channel(exchange_name, message, queue)

    async def _publish_on_channel(
        self, exchange_name: str, message: aio_pika.Message, queue: str
    ) -> None:
        exchange = await self._channel.get_exchange(exchange_name, ensure=False)
        try:
            await exchange.publish(message, routing_key=queue, timeout=10)
        except aio_pika.exceptions.PublishError:
            if self._restore is None:
                raise
            logger.warning(
                "no queue took a message for %s through %s; declaring the "
                "topology again",
                queue,
                exchange_name,
                extra={"action": "topology.restored", "queue": queue},
            )
            await self._restore()
            await exchange.publish(message, routing_key=queue, timeout=10)

    async def dead_letter(
        self,
        raw: AbstractIncomingMessage,
        queue: str,
        reason: str,
        *,
        part: tuple[bytes, str] | None = None,
        row_failed: bool = False,
    ) -> None:
        """Set ``raw`` aside, or only ``part`` of it: (body, message id)."""
        headers = sendable_headers(raw.headers or {})
        if row_failed:
            headers[topology.ROW_FAILED_HEADER] = True
        headers.update(
            {
                topology.REASON_HEADER: reason[:1000],
                topology.ORIGIN_QUEUE_HEADER: queue,
                topology.ORIGIN_EXCHANGE_HEADER: raw.exchange or "",
                topology.ORIGIN_ROUTING_KEY_HEADER: raw.routing_key or "",
                DEAD_LETTERED_AT_HEADER: datetime.now(UTC).isoformat(),
            }
        )
        exchange = topology.DEAD_LETTER_EXCHANGE
        try:
            await self._publish(exchange, _copy(raw, headers, part), queue)
        except (TypeError, ValueError) as exc:
            # A header the client cannot write (the frame is built, and refused,
            # before anything is sent): the dead letter goes with this module's
            # headers alone, and says what was dropped.
            ours = {k: v for k, v in headers.items() if k.startswith("x-notiflow-")}
            ours[topology.REASON_HEADER] = (
                f"{reason[:800]} (its other headers were dropped: {exc})"
            )
            await self._publish(exchange, _copy(raw, ours, part), queue)

    async def retry(
        self,
        raw: AbstractIncomingMessage,
        queue: str,
        delay_seconds: int,
        *,
        part: tuple[bytes, str] | None = None,
    ) -> None:
        """Park ``raw``, or only ``part`` of it, in the delay queue."""
        headers = sendable_headers(raw.headers or {})
        headers[topology.ATTEMPT_HEADER] = _attempts(headers) + 1
        # The retry queue dead-letters through the default exchange, which routes by
        # queue name: the routing key is the queue the message returns to.
        await self._publish(
            topology.RetryLevel(delay_seconds).exchange,
            _copy(raw, headers, part),
            queue,
        )


def sendable_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """``headers`` as the client can write them back. A string header that is not
    UTF-8 arrives as bytes, which the client will not encode; as a byte array it
    goes back unchanged."""

    def value(v: Any) -> Any:
        if isinstance(v, bytes):
            return bytearray(v)
        if isinstance(v, Mapping):
            return {str(k): value(item) for k, item in v.items()}
        if isinstance(v, list | tuple):
            return [value(item) for item in v]
        return v

    return {str(k): value(v) for k, v in headers.items()}


def _attempts(headers: Mapping[str, Any]) -> int:
    """How many times a message was parked for a retry; a header that is no whole
    number, set by someone else, counts as none."""
    given = headers.get(topology.ATTEMPT_HEADER, 0)
    if isinstance(given, bool) or not isinstance(given, int):
        return 0
    return max(given, 0)


def _copy(
    raw: AbstractIncomingMessage,
    headers: dict[str, Any],
    part: tuple[bytes, str] | None = None,
) -> aio_pika.Message:
    body, message_id = part or (raw.body, raw.message_id)
    return aio_pika.Message(
        body=body,
        headers=headers,
        content_type=raw.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=raw.priority,
        # The client matches a message the broker hands back (no queue took it)
        # to its publish by this id; without one, it would count as confirmed.
        message_id=message_id or uuid.uuid4().hex,
        timestamp=raw.timestamp,
    )


class Consumers:
    """Registers subscribers on a FastStream broker with the policy above."""

    def __init__(
        self, broker: RabbitBroker, publisher: Callable[[], Publisher]
    ) -> None:
        self._broker = broker
        self._publisher = publisher
        self.queues: list[str] = []
        self.stopping = False
        self._subscribers: dict[str, Any] = {}
        self._batchers: list[_Batcher[Any]] = []
        # Each message being handled, and its queue.
        self._handling: dict[asyncio.Task[str], str] = {}
        # Handlings whose delivery was lost before they ended (see _start_handling).
        self._orphans: set[asyncio.Task[str]] = set()
        self._unsubscribed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # Per queue: the messages taken so far, those in hand now, and what the
        # last look for a stall saw (see stalled()).
        self._taken: dict[str, int] = {}
        self._in_hand: dict[str, int] = {}
        self._looked: dict[str, tuple[int, int | None]] = {}

    @property
    def in_flight(self) -> int:
        """The messages in hand, of every queue."""
        return sum(self._in_hand.values())

    async def missing(self) -> list[str]:
        """The queues this process should consume but has no live consumer on."""
        return [
            queue
            for queue, subscriber in self._subscribers.items()
            if not await _consuming(subscriber)
        ]

    async def cancelled(self) -> list[str]:
        """The queues whose consumer the broker cancelled on a channel still open."""
        return [
            queue
            for queue, subscriber in self._subscribers.items()
            if await _cancelled(subscriber)
        ]

    async def resume(self, queues: Sequence[str]) -> None:
        """Consume again from ``queues``, which must exist again by now.

        The consumer comes back on its own channel under its own tag: prefetch,
        batching and stopping work as before.
        """
        for queue in queues:
            if self.stopping:
                return
            subscriber = self._subscribers[queue]
            if await _cancelled(subscriber):
                # aio-pika's queue keeps each consumer it started, to start them
                # again after a reconnect; this is that step, without the reconnect.
                await subscriber._queue_obj.restore()
                logger.warning(
                    "consuming %s again: the broker had cancelled its consumer",
                    queue,
                    extra={"action": "consumer.resumed", "queue": queue},
                )

    async def stalled(
        self, waiting: Callable[[str], Awaitable[int | None]]
    ) -> dict[str, int]:
        """The queues whose consumer has taken nothing, and holds nothing, since
        the last look, while messages waited in the queue at both looks; with how
        many wait now. ``waiting`` asks the broker how many a queue holds ready.

        A consumer with room for more is handed whatever waits; one that takes
        nothing while its queue fills has lost its deliveries somewhere between
        the broker and its handler (seen once after a queue was deleted while
        the broker failed a channel), and would otherwise stay so, and ready,
        until the process restarts.
        """
        found: dict[str, int] = {}
        for queue in self._subscribers:
            if self.stopping:
                return {}
            taken = self._taken.get(queue, 0)
            before = self._looked.get(queue)
            if self._in_hand.get(queue, 0) or before is None or before[0] != taken:
                self._looked[queue] = (taken, None)
                continue
            ready = await waiting(queue)
            if ready and before[1]:
                found[queue] = ready
                del self._looked[queue]
            else:
                self._looked[queue] = (taken, ready)
        return found

    async def restart(self, queue: str) -> None:
        """Consume from ``queue`` on a new channel. The broker takes back what it
        had delivered on the old one and not had acknowledged, and hands it out
        again."""
        subscriber = self._subscribers[queue]
        channel = await subscriber._queue_obj.channel.get_underlay_channel()
        await channel.close()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self, drain_seconds: float) -> None:
        """Take nothing more, give back what has not started, let the rest finish.

        Returns once no message is in hand: after at most ``drain_seconds``, and
        the moment it takes to give back what is still being handled then.
        """
        self.stopping = True
        try:
            for queue, subscriber in self._subscribers.items():
                await _unsubscribe(subscriber, queue)
        finally:
            # Deliveries that came while the subscriptions were being cancelled
            # wait for this: given back before, they could come straight back.
            self._unsubscribed.set()
        for batcher in self._batchers:
            batcher.give_back()
        if await self.wait_idle(drain_seconds):
            return
        self._abandon(drain_seconds)
        if not await self.wait_idle(ABANDON_SECONDS):
            logger.error(
                "%s still in hand after being cancelled",
                _count(self.in_flight, "message", "messages"),
                extra={"action": "consumer.stuck"},
            )

    def _abandon(self, drain_seconds: float) -> None:
        """Cancel what is still being handled; each message goes back to its queue."""
        counts: dict[str, int] = {}
        for queue in self._handling.values():
            counts[queue] = counts.get(queue, 0) + 1
        batched = {batcher.queue: batcher.running_items for batcher in self._batchers}
        for queue, count in counts.items():
            items = batched.get(queue)
            logger.warning(
                "the drain time of %gs ran out: giving back %s from %s still being "
                "handled (%s); what they had claimed stays claimed until its lease "
                "runs out",
                drain_seconds,
                _count(count, "message", "messages"),
                queue,
                "each alone" if items is None else _count(items, "item", "items"),
                extra={"action": "consumer.abandoned", "queue": queue},
            )
        for batcher in self._batchers:
            batcher.cancel()
        for task in self._handling:
            task.cancel()

    def subscribe(
        self,
        queue: str,
        model: type[M],
        handler: Handler[M],
        *,
        prefetch: int,
        action: str,
        envelope: type[Envelope[M]] | None = None,
    ) -> None:
        """Call ``handler`` once per message, up to ``prefetch`` at a time.

        With ``envelope``, a message may also carry several ``model`` messages;
        ``handler`` is called once for each of them.
        """

        async def run(payload: M, raw: AbstractIncomingMessage) -> None:
            await self.while_database_away(
                lambda: handler(payload, raw), queue=queue, action=action
            )

        self._consume(queue, model, envelope, run, prefetch=prefetch, action=action)

    def subscribe_batch(
        self,
        queue: str,
        model: type[M],
        handler: BatchHandler[M],
        *,
        prefetch: int,
        max_batch: int,
        workers: int = 2,
        max_items: int | None = None,
        slow_after: float | None = None,
        action: str,
        envelope: type[Envelope[M]] | None = None,
    ) -> None:
        """Call ``handler`` with up to ``max_batch`` waiting messages at a time.

        ``workers`` batches may run at once; while they do, new messages gather
        for the next one. The items of an ``envelope`` join batches like messages.
        ``max_items`` bounds the items of running batches not yet settled (see
        :meth:`Item.finished`); by default, ``workers`` full batches' worth. A
        batch still running ``slow_after`` seconds after it started no longer
        counts against ``workers``, only its unsettled items against ``max_items``.
        """
        batcher: _Batcher[M] = _Batcher(
            self,
            handler,
            queue,
            action,
            max_batch=max_batch,
            workers=workers,
            max_items=max_items,
            slow_after=slow_after,
        )
        self._batchers.append(batcher)
        self._consume(
            queue, model, envelope, batcher.submit, prefetch=prefetch, action=action
        )

    def _consume(
        self,
        queue: str,
        model: type[M],
        envelope: type[Envelope[M]] | None,
        run: Handler[M],
        *,
        prefetch: int,
        action: str,
    ) -> None:
        self.queues.append(queue)
        subscriber = self._broker.subscriber(
            RabbitQueue(queue, declare=False),
            channel=Channel(prefetch_count=prefetch),
            ack_policy=AckPolicy.MANUAL,
            # The body is decoded by :func:`contracts.messages.decode` in the handler;
            # FastStream's own JSON decoding would fail on a malformed body before
            # the handler runs, and the message would sit unacked for ever.
            decoder=_undecoded,
        )
        self._subscribers[queue] = subscriber

        @subscriber
        async def consume(message: RabbitMessage) -> None:
            # The broker runs without FastStream's dependency injection
            # (``apply_types=False``), which would resolve the message through a
            # worker thread for every delivery; the decoder hands over the message
            # itself instead.
            raw: AbstractIncomingMessage = message.raw_message
            self._taken[queue] = self._taken.get(queue, 0) + 1
            self._in_hand[queue] = self._in_hand.get(queue, 0) + 1
            self._idle.clear()
            gauge = metrics.CONSUMER_IN_FLIGHT.labels(queue)
            gauge.inc()
            released = False

            def release() -> None:
                nonlocal released
                if not released:
                    released = True
                    gauge.dec()
                    self._in_hand[queue] -= 1
                    if self.in_flight == 0:
                        self._idle.set()

            task: asyncio.Task[str] | None = None
            try:
                if self.stopping:
                    # Delivered while the subscription was being cancelled.
                    await self._unsubscribed.wait()
                    await message.nack(requeue=True)
                    outcome = "returned"
                else:
                    try:
                        with tracing.span(
                            f"consume {queue}",
                            parent_headers=raw.headers or {},
                            kind=SpanKind.CONSUMER,
                        ):
                            task = self._start_handling(
                                queue,
                                self._handle(
                                    queue, model, envelope, run, message, raw, action
                                ),
                                release,
                            )
                            outcome = await self._handled(message, task)
                    except Exception:
                        # Neither acked nor set aside (its retry or dead letter
                        # could not be published in time, say). Left as it is on
                        # a channel that stays open, it would hold its prefetch
                        # slot until the process stops: it is handed back, to
                        # come again and find its row saying what is left to do.
                        # On a channel that closed, the broker returns it anyway.
                        logger.exception(
                            "could not settle a message from %s; returning it "
                            "to the queue",
                            queue,
                            extra={"action": f"{action}.unsettled", "queue": queue},
                        )
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(
                                message.nack(requeue=True), RETURN_SECONDS
                            )
                        raise
                metrics.MESSAGES_HANDLED.labels(queue, outcome).inc()
            finally:
                # A handling that goes on without this callback counts as in hand
                # until it ends.
                if task is None or task.done():
                    release()

    def _start_handling(
        self,
        queue: str,
        handling: Coroutine[Any, Any, str],
        release: Callable[[], None],
    ) -> asyncio.Task[str]:
        """``handling`` in a task of its own, which only :meth:`stop` cancels.

        When the connection to the broker drops, the client cancels the callbacks
        of the deliveries in hand. Work that had claimed a row would stop halfway
        and leave the row claimed until its lease runs out, to be done a second
        time then (a push sent twice, say). So the task goes on to the end: its
        row ends as it should, its ack fails on the closed channel, and the broker
        hands the message out again, to find the row done.
        """
        task = asyncio.create_task(handling, name=f"consume {queue}")
        self._handling[task] = queue

        def ended(done: asyncio.Task[str]) -> None:
            del self._handling[done]
            release()
            if done in self._orphans:
                self._orphans.discard(done)
                failure = None if done.cancelled() else done.exception()
                if failure is None:
                    logger.info(
                        "finished a message from %s after its delivery was lost; "
                        "the broker hands it out again, and its row says it is done",
                        queue,
                        extra={"action": "consumer.finished_orphan", "queue": queue},
                    )
                else:
                    # Its ack, or the retry or dead letter it was to publish,
                    # could not go out on the lost connection.
                    logger.warning(
                        "handled a message from %s after its delivery was lost, "
                        "but could not settle it with the broker: %r; the broker "
                        "hands it out again, which finds its row done, or else "
                        "the recovery sweep takes the row up once it is due",
                        queue,
                        failure,
                        extra={"action": "consumer.orphan_unsettled", "queue": queue},
                    )

        task.add_done_callback(ended)
        return task

    async def _handled(self, message: Any, task: asyncio.Task[str]) -> str:
        """How ``task`` ended."""
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                # This callback is cancelled (the connection dropped, or the
                # consumer stops), not the work: it goes on without it.
                self._orphans.add(task)
                raise
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            # The drain time ran out before the message was handled.
            await message.nack(requeue=True)
            return "abandoned"

    async def _handle(
        self,
        queue: str,
        model: type[M],
        envelope: type[Envelope[M]] | None,
        run: Handler[M],
        message: Any,
        raw: AbstractIncomingMessage,
        action: str,
    ) -> str:
        """Handle one message; return how it ended, for the metrics."""
        started = time.perf_counter()
        try:
            parts, enveloped = decode_items(model, raw.body, envelope)
        except BadMessage as exc:
            await self._set_aside(raw, queue, exc.reason)
            return "dead_lettered"
        except Exception as exc:
            # Whatever else a body makes decoding raise would do so on every
            # delivery; left unacked, the message would hold a prefetch slot for
            # ever. It is set aside with the error, which names what to fix.
            logger.exception(
                "could not decode a message", extra={"action": f"{action}.undecodable"}
            )
            reason = f"body could not be decoded: {type(exc).__name__}: {exc}"
            await self._set_aside(raw, queue, reason)
            return "dead_lettered"

        parts = [_on_its_queue(part, queue) for part in parts]
        items = [(i, part) for i, part in enumerate(parts) if part.message is not None]
        settled: set[int] = set()

        async def settle(index: int, outcome: Exception) -> None:
            part = parts[index]
            # An item of an envelope goes on alone; a whole message goes as it came.
            alone = (
                (part.body, _part_id(raw, part.message, index)) if enveloped else None
            )
            with bind(**(_ids(part.message) if part.message is not None else {})):
                await self._settle_failure(queue, raw, outcome, alone, action)

        async def handled(index: int, item: M) -> Exception | None:
            outcome = await _bound_outcome(run, item, raw, queue)
            if outcome is not None and not isinstance(outcome, ShuttingDown):
                # Parked or set aside as soon as it failed: its retry's delay
                # runs from now, not from when the slowest item of the message
                # ends. Settled with the rest if that cannot be done now.
                with contextlib.suppress(Exception):
                    await settle(index, outcome)
                    settled.add(index)
            return outcome

        if len(items) == 1:
            _, part = items[0]
            done = [await _bound_outcome(run, cast(M, part.message), raw, queue)]
        else:
            # Each item in a task of its own, so that each binds its own ids.
            done = list(
                await asyncio.gather(
                    *(handled(i, cast(M, part.message)) for i, part in items)
                )
            )
        if any(isinstance(outcome, ShuttingDown) for outcome in done):
            # Handed out again whole; an item settled already finds its row
            # waiting for its retry, or failed, and leaves it alone.
            await message.nack(requeue=True)
            return "returned"

        answers = iter(done)
        outcomes: list[Exception | None] = [
            next(answers) if part.problem is None else DeadLetter(part.problem.reason)
            for part in parts
        ]
        for index, outcome in enumerate(outcomes):
            if outcome is not None and index not in settled:
                await settle(index, outcome)
        await _ack(raw)

        failures = [o for o in outcomes if o is not None]
        if not failures:
            logger.debug(
                "handled %d in %.1f ms",
                len(items),
                (time.perf_counter() - started) * 1000,
                extra={"action": f"{action}.done"},
            )
            return "acked"
        if len(outcomes) > 1:
            return "split"
        return "retried" if isinstance(failures[0], RetryLater) else "dead_lettered"

    async def _settle_failure(
        self,
        queue: str,
        raw: AbstractIncomingMessage,
        outcome: Exception,
        part: tuple[bytes, str] | None,
        action: str,
    ) -> None:
        """Park or set aside what failed, before the message is acked."""
        if isinstance(outcome, RetryLater):
            await self._publisher().retry(raw, queue, outcome.delay_seconds, part=part)
            metrics.RETRIES.labels(queue).inc()
            logger.info(
                "retry in %ds: %s",
                outcome.delay_seconds,
                outcome.reason,
                extra={"action": f"{action}.retry", "queue": queue},
            )
            return
        row_failed = False
        if isinstance(outcome, DeadLetter):
            reason, row_failed = outcome.reason, outcome.row_failed
        else:
            logger.error(
                "handler failed; dead-lettering the message",
                exc_info=outcome,
                extra={"action": f"{action}.crashed", "queue": queue},
            )
            reason = f"handler error: {outcome!r}"
        await self._dead_letter(raw, queue, reason, part, row_failed=row_failed)

    async def while_database_away(
        self, attempt: Callable[[], Awaitable[T]], *, queue: str, action: str
    ) -> T:
        """Run ``attempt``, again and again while the database is away."""
        backoff = _Backoff()
        while True:
            try:
                return await attempt()
            except Exception as exc:
                if not is_unavailable(exc):
                    raise
                if self.stopping:
                    raise ShuttingDown from exc
                delay = backoff.next()
                logger.warning(
                    "the database cannot take this now, trying again in %.1fs: %r",
                    delay,
                    exc,
                    extra={"action": f"{action}.backoff", "queue": queue},
                )
                await asyncio.sleep(delay)

    async def _set_aside(
        self, raw: AbstractIncomingMessage, queue: str, reason: str
    ) -> None:
        await self._dead_letter(raw, queue, reason, None)
        await _ack(raw)

    async def _dead_letter(
        self,
        raw: AbstractIncomingMessage,
        queue: str,
        reason: str,
        part: tuple[bytes, str] | None,
        *,
        row_failed: bool = False,
    ) -> None:
        await self._publisher().dead_letter(
            raw, queue, reason, part=part, row_failed=row_failed
        )
        metrics.DEAD_LETTERS.labels(queue).inc()
        logger.warning(
            "dead-lettered a message from %s: %s",
            queue,
            reason,
            extra={"action": "message.dead_lettered", "queue": queue},
        )


# The channel type each delivery queue carries.
_DELIVERY_TYPES = {topology.delivery_queue(t): t for t in topology.CHANNEL_TYPES}


def _on_its_queue(part: Part[M], queue: str) -> Part[M]:
    """``part``, or in its place the problem of a delivery of another channel type
    than the delivery queue it came from: a routing mistake, which handling it
    would hide (its row may be of the queue's type and already sent)."""
    expected = _DELIVERY_TYPES.get(queue)
    given = getattr(part.message, "type", None)
    if expected is None or part.message is None or given == expected:
        return part
    problem = BadMessage(f"a delivery of type {given} on the {expected} queue")
    return Part(None, problem, part.body)


class _Batcher(Generic[M]):
    """Gathers the messages of one queue into batches for a :data:`BatchHandler`.

    A batch starts while fewer than ``workers`` run and the items of running
    batches not yet settled leave room for it: a whole batch's worth, or all that
    wait, so that when places free up one by one under load the next batch still
    starts full. While the workers are busy, messages gather into larger batches.

    A batch that waits on a slow item (a peer that answers late) would keep a
    worker, and everything behind it, waiting. With ``slow_after``, a batch running
    longer than that stops counting as a worker; and items its handler settles
    early (:meth:`Item.finished`) give their places back at once, so the batch
    holds only the places of the items it still waits on.
    """

    def __init__(
        self,
        consumers: Consumers,
        handler: BatchHandler[M],
        queue: str,
        action: str,
        *,
        max_batch: int,
        workers: int,
        max_items: int | None = None,
        slow_after: float | None = None,
    ) -> None:
        if max_batch < 1 or workers < 1:
            raise ValueError("max_batch and workers must be at least 1")
        if max_items is None:
            max_items = workers * max_batch
        if max_items < max_batch:
            raise ValueError("max_items must hold at least one whole batch")
        self._consumers = consumers
        self._handler = handler
        self.queue = queue
        self._action = action
        self._max_batch = max_batch
        self._workers = workers
        self._max_items = max_items
        self._slow_after = slow_after
        # Items of running batches whose messages are not yet settled.
        self._holding = 0
        # Running batches that have run longer than ``slow_after``, and the timers
        # of the others.
        self._slow: set[asyncio.Task[None]] = set()
        self._timers: dict[asyncio.Task[None], asyncio.TimerHandle] = {}
        self._waiting: deque[tuple[Item[M], asyncio.Future[None]]] = deque()
        # Each running batch, and how many items it has.
        self._running: dict[asyncio.Task[None], int] = {}
        self._scheduled = False
        self._given_back = False
        self._sizes = metrics.BATCH_SIZE.labels(queue)

    async def submit(self, payload: M, raw: AbstractIncomingMessage) -> None:
        """Queue one message; return when its batch is done, or raise its outcome."""
        if self._given_back:
            raise ShuttingDown
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        item = Item(
            payload,
            raw,
            contextvars.copy_context(),
            _finish=lambda: _settle(done, None),
            _fail=lambda outcome: _settle(done, outcome),
        )
        self._waiting.append((item, done))
        if not self._scheduled:
            # Start on the next turn of the loop, so that the messages delivered
            # together with this one join its batch.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)
        await done

    def give_back(self) -> None:
        """Start no more batches; every waiting message goes back to the broker."""
        self._given_back = True
        while self._waiting:
            _, done = self._waiting.popleft()
            if not done.done():
                done.set_exception(ShuttingDown())

    @property
    def running_items(self) -> int:
        """Items of running batches not yet settled."""
        return self._holding

    def cancel(self) -> None:
        """Cancel the running batches; their messages go back to the broker."""
        for task in self._running:
            task.cancel()

    def _start(self) -> None:
        self._scheduled = False
        if self._consumers.stopping:
            # Held for :meth:`give_back`, once no more deliveries can come.
            return
        while self._waiting and len(self._running) - len(self._slow) < self._workers:
            count = min(self._max_batch, len(self._waiting))
            if self._holding + count > self._max_items:
                break
            batch = [self._waiting.popleft() for _ in range(count)]
            self._holding += count
            for _, done in batch:
                done.add_done_callback(self._released)
            task = asyncio.create_task(self._run(batch), name=f"batch {self.queue}")
            self._running[task] = count
            task.add_done_callback(self._finished)
            if self._slow_after is not None:
                self._timers[task] = asyncio.get_running_loop().call_later(
                    self._slow_after, self._slowed, task
                )

    def _schedule(self) -> None:
        if self._waiting and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    def _released(self, _: asyncio.Future[None]) -> None:
        self._holding -= 1
        self._schedule()

    def _slowed(self, task: asyncio.Task[None]) -> None:
        self._timers.pop(task, None)
        if task in self._running:
            self._slow.add(task)
            self._schedule()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._slow.discard(task)
        timer = self._timers.pop(task, None)
        if timer is not None:
            timer.cancel()
        self._start()

    async def _run(self, batch: list[tuple[Item[M], asyncio.Future[None]]]) -> None:
        items = [item for item, _ in batch]
        self._sizes.observe(len(items))
        try:
            outcomes = await self._outcomes(items)
        except ShuttingDown:
            outcomes = [ShuttingDown() for _ in items]
        except asyncio.CancelledError:
            for _, done in batch:
                done.cancel()
            raise
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            if done.done():
                continue
            if outcome is None:
                done.set_result(None)
            else:
                done.set_exception(outcome)

    async def _outcomes(self, items: list[Item[M]]) -> list[Exception | None]:
        try:
            return await self._attempt(items)
        except (ShuttingDown, asyncio.CancelledError):
            raise
        except Exception as exc:
            if len(items) == 1:
                return [exc]
            # One message may have broken the whole batch; find which by handling
            # each alone, so that only that one is dead-lettered.
            logger.warning(
                "batch of %d failed (%r); handling its messages one by one",
                len(items),
                exc,
                extra={"action": f"{self._action}.batch_failed", "queue": self.queue},
            )
            results: list[Exception | None] = []
            for item in items:
                try:
                    results.extend(await self._attempt([item]))
                except (ShuttingDown, asyncio.CancelledError):
                    raise
                except Exception as single:
                    results.append(single)
            return results

    async def _attempt(self, items: list[Item[M]]) -> list[Exception | None]:
        outcomes = list(
            await self._consumers.while_database_away(
                lambda: self._handler(items), queue=self.queue, action=self._action
            )
        )
        if len(outcomes) != len(items):
            raise RuntimeError(
                f"batch handler answered {len(outcomes)} outcomes for "
                f"{len(items)} messages"
            )
        return outcomes


def _settle(done: asyncio.Future[None], outcome: Exception | None) -> None:
    """End an item's wait: handled with no ``outcome``, else failed as it says."""
    if done.done():
        return
    if outcome is None:
        done.set_result(None)
    else:
        done.set_exception(outcome)


async def _ack(raw: AbstractIncomingMessage) -> None:
    """Ack ``raw`` without waiting for the frame to be written to the socket.

    aio-pika's ``ack`` waits until the connection's writer has drained the frame,
    which costs a turn of the loop and a wake-up per message while the ack itself
    has no reply. If the connection fails before the frame goes out, RabbitMQ
    redelivers the message, just as it does when an ack is lost on the wire; every
    consumer is idempotent for that reason. The message is locked as aio-pika's
    ``ack`` locks it, so that nothing acks it twice.
    """
    if raw.delivery_tag is not None:
        await raw.channel.basic_ack(raw.delivery_tag, wait=False)
    raw.lock()


async def _undecoded(message: Any) -> Any:
    return message


class ShuttingDown(Exception):
    """The service is stopping and the message was not handled: give it back.

    Either it had not started, or the database is still away. A handler that has
    waited (for a place, say) since its message was delivered raises it rather
    than start work the drain may not leave time to finish: :attr:`Consumers.stopping`
    says when. A message any item of which gives itself back goes back whole.
    """


async def _unsubscribe(subscriber: Any, queue: str) -> None:
    """Cancel ``subscriber``'s consumer, so that the broker delivers no more.

    The messages it delivered stay unacked, in this process's hands. FastStream
    would cancel the consumer only once its handlers are done (see
    :func:`_consuming` for the attributes it keeps them in); with the tag cleared
    it skips that.
    """
    queue_obj = getattr(subscriber, "_queue_obj", None)
    tag = getattr(subscriber, "_consumer_tag", None)
    if queue_obj is None or tag is None or queue_obj.channel.is_closed:
        return
    try:
        await queue_obj.cancel(tag, timeout=UNSUBSCRIBE_SECONDS)
    except Exception as exc:
        logger.warning(
            "could not cancel the consumer of %s: %r",
            queue,
            exc,
            extra={"action": "consumer.unsubscribe_failed", "queue": queue},
        )
        # Deliveries for the tag are then dropped as they arrive, rather than
        # given back to come straight back; they stay unacked, and the broker
        # takes them back when the channel closes.
        with contextlib.suppress(Exception):
            channel = await queue_obj.channel.get_underlay_channel()
            channel.consumers.pop(tag, None)
    subscriber._consumer_tag = None


async def _subscribed(subscriber: Any) -> bool | None:
    """Whether the broker delivers to ``subscriber``'s consumer on its open channel;
    None while there is no open channel, or no consumer started."""
    # FastStream 0.7 keeps the aio-pika queue and the consumer tag on the subscriber
    # (``_queue_obj``, ``_consumer_tag``); aio-pika's robust queue re-consumes with the
    # same tag after a reconnect, and aiormq drops a tag from ``consumers`` when the
    # broker cancels it. A tag present on an open channel is a live consumer.
    queue = getattr(subscriber, "_queue_obj", None)
    tag = getattr(subscriber, "_consumer_tag", None)
    if queue is None or tag is None or queue.channel.is_closed:
        return None
    try:
        channel = await queue.channel.get_underlay_channel()
    except Exception:
        return None
    return None if channel.is_closed else tag in channel.consumers


async def _consuming(subscriber: Any) -> bool:
    return await _subscribed(subscriber) is True


async def _cancelled(subscriber: Any) -> bool:
    # The channel is open and the tag is still the subscriber's, yet the channel no
    # longer delivers to it: the broker cancelled it (its queue was deleted).
    return await _subscribed(subscriber) is False


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def _ids(payload: Message) -> dict[str, str]:
    return {
        key: str(getattr(payload, key))
        for key in ("event_id", "notification_id")
        if getattr(payload, key, None) is not None
    }


async def _outcome(
    run: Handler[M], payload: M, raw: AbstractIncomingMessage
) -> Exception | None:
    """None when ``run`` handled ``payload``, else what it raised."""
    try:
        await run(payload, raw)
    except Exception as exc:
        return exc
    return None


async def _bound_outcome(
    run: Handler[M], payload: M, raw: AbstractIncomingMessage, queue: str
) -> Exception | None:
    """``_outcome`` with ``payload``'s ids bound for the logs, and inside its own
    trace when it carries one (a delivery travelling with other events')."""
    with bind(**_ids(payload)):
        trace = getattr(payload, "trace", None)
        if not trace:
            return await _outcome(run, payload, raw)
        with tracing.span(
            f"consume {queue}", parent_headers=trace, kind=SpanKind.CONSUMER
        ):
            return await _outcome(run, payload, raw)


def _part_id(raw: AbstractIncomingMessage, item: Message | None, index: int) -> str:
    notification_id = getattr(item, "notification_id", None)
    if notification_id is not None:
        return f"notification-{notification_id}"
    return f"{raw.message_id or 'message'}#{index}"


class _Backoff:
    def __init__(self, first: float = 0.5, cap: float = 5.0) -> None:
        self._first = first
        self._cap = cap
        self._current = 0.0

    def next(self) -> float:
        self._current = min(self._cap, self._current * 2 or self._first)
        return self._current

    def reset(self) -> None:
        self._current = 0.0
