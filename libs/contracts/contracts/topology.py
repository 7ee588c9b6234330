"""Exchange, queue and routing names, defined once, and their declaration.

Queue types, chosen for what each queue holds:

* ``notiflow.dispatcher.comment-created`` and ``notiflow.dead-letters`` are quorum
  queues: they hold work nobody else can recreate, so they are replicated on a
  cluster, and quorum's ``x-delivery-limit`` stops a message that crashes its
  consumer over and over. The dead-letter queue declares no limit, but RabbitMQ
  4.0 and later give it one of 20 all the same, and drop a message returned more
  often than that; ``notiflow-admin`` therefore never returns a dead letter it
  leaves in place, it publishes a copy (see :mod:`contracts.admin`). Its arguments
  cannot change now: RabbitMQ refuses to redeclare a queue with other arguments,
  and RabbitMQ 3.x reads an ``x-delivery-limit`` of -1 as dropping a message the
  first time it is returned.
* The delivery queues are classic queues with ``x-max-priority``: RabbitMQ 3.10
  and 3.11 ignore priorities on quorum queues, and overtaking a backlog of low
  priority notifications with an urgent one is the point of these queues. Losing one
  of them costs nothing committed: the notification rows in PostgreSQL are the
  truth, and stuck rows are re-published from there.
* The retry queues are classic queues with a per-queue TTL; expired messages are
  dead-lettered through the default exchange straight back to the queue named by
  their routing key.
"""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel

EVENTS_EXCHANGE = "notiflow.events"
DELIVERIES_EXCHANGE = "notiflow.deliveries"
DEAD_LETTER_EXCHANGE = "notiflow.dead-letters"

COMMENT_CREATED = "comment.created"

DISPATCHER_QUEUE = "notiflow.dispatcher.comment-created"
DEAD_LETTER_QUEUE = "notiflow.dead-letters"

CHANNEL_TYPES = ("email", "sse", "push")
MAX_PRIORITY = 9
DELIVERY_LIMIT = 10

# Dead-letter headers: why the message was set aside, and where it came from.
REASON_HEADER = "x-notiflow-reason"
ORIGIN_QUEUE_HEADER = "x-notiflow-queue"
ORIGIN_EXCHANGE_HEADER = "x-notiflow-exchange"
ORIGIN_ROUTING_KEY_HEADER = "x-notiflow-routing-key"
ATTEMPT_HEADER = "x-notiflow-attempt"
# On a dead letter whose notification row its consumer marked ``failed``: replaying
# it sends nothing, and ``notiflow-admin requeue-failed`` is what sends it again.
ROW_FAILED_HEADER = "x-notiflow-row-failed"


def delivery_queue(channel_type: str) -> str:
    """The queue a channel type's sender consumes; its routing key is the type."""
    return f"notiflow.deliveries.{channel_type}"


@dataclass(frozen=True)
class RetryLevel:
    seconds: int

    @property
    def exchange(self) -> str:
        return f"notiflow.retry.{self.seconds}s"

    @property
    def queue(self) -> str:
        return f"notiflow.retry.{self.seconds}s"


DEFAULT_RETRY_DELAYS = (5, 30, 120, 600, 3600)


def retry_levels(delays: tuple[int, ...] = DEFAULT_RETRY_DELAYS) -> list[RetryLevel]:
    return [RetryLevel(seconds) for seconds in delays]


async def declare(
    channel: AbstractChannel, retry_delays: tuple[int, ...] = DEFAULT_RETRY_DELAYS
) -> None:
    """Declare every exchange and queue; safe to call from every service at start."""
    events = await channel.declare_exchange(
        EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    deliveries = await channel.declare_exchange(
        DELIVERIES_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    dead = await channel.declare_exchange(
        DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )

    dispatcher = await channel.declare_queue(
        DISPATCHER_QUEUE,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            # Past the limit RabbitMQ dead-letters instead of dropping; the
            # x-death header then says "delivery_limit".
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        },
    )
    await dispatcher.bind(events, COMMENT_CREATED)

    for channel_type in CHANNEL_TYPES:
        queue = await channel.declare_queue(
            delivery_queue(channel_type),
            durable=True,
            arguments={"x-max-priority": MAX_PRIORITY},
        )
        await queue.bind(deliveries, channel_type)

    dlq = await channel.declare_queue(
        DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dlq.bind(dead)

    for level in retry_levels(retry_delays):
        exchange = await channel.declare_exchange(
            level.exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(
            level.queue,
            durable=True,
            arguments={
                "x-message-ttl": level.seconds * 1000,
                "x-dead-letter-exchange": "",
            },
        )
        await queue.bind(exchange)
