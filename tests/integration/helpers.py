"""Rows, messages and queue probes the integration tests share."""

from __future__ import annotations

import json
import struct
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import pamqp.encode
import pytest
from prometheus_client import REGISTRY

from contracts import topology
from contracts.messages import ChannelType, DeliveryRequested

INSERT_EVENT = """
INSERT INTO events (id, type, payload, occurred_at) VALUES ($1, 'test', '{}', now())
"""

INSERT_ROW = """
INSERT INTO notifications (event_id, user_id, email, title, message, type, channel,
                           priority, event_occurred_at)
VALUES ($1, $2, $3, $4, 'hello', $5, 'comment.reply', $6, now())
RETURNING id
"""


async def email_row(
    db: asyncpg.Connection,
    user_id: int,
    email: str | None,
    *,
    priority: int = 0,
    title: str = "A reply",
    event_id: uuid.UUID | None = None,
) -> int:
    """A pending email notification row, with an event of its own unless given."""
    if event_id is None:
        event_id = uuid.uuid4()
        await db.execute(INSERT_EVENT, event_id)
    return await db.fetchval(
        INSERT_ROW, event_id, user_id, email, title, "email", priority
    )


async def row(db: asyncpg.Connection, notification_id: int) -> dict[str, Any]:
    return dict(
        await db.fetchrow("SELECT * FROM notifications WHERE id = $1", notification_id)
    )


def delivery(
    notification_id: int,
    user_id: int,
    priority: int = 0,
    *,
    channel_type: ChannelType = "email",
) -> bytes:
    return DeliveryRequested(
        notification_id=notification_id,
        event_id=uuid.uuid4(),
        user_id=user_id,
        type=channel_type,
        channel="comment.reply",
        priority=priority,
        event_occurred_at=datetime.now(UTC),
    ).to_bytes()


async def publish(
    amqp_url: str,
    bodies: list[bytes],
    *,
    routing_key: str = "email",
    exchange: str = topology.DELIVERIES_EXCHANGE,
    priorities: list[int] | None = None,
    declare: bool = True,
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish raw bodies with confirms, the way the outbox relay does; first
    declaring the topology, as every service does at start, unless told not to."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        if declare:
            await topology.declare(channel, (1, 2))
        target = await channel.get_exchange(exchange, ensure=False)
        for index, body in enumerate(bodies):
            await target.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    priority=(priorities or [0] * len(bodies))[index],
                    headers=headers,
                ),
                routing_key=routing_key,
                timeout=10,
            )


async def depths(amqp_url: str, *queues: str) -> dict[str, int]:
    """Messages ready in each queue, from passive declares."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        found = {}
        for name in queues:
            queue = await channel.declare_queue(name, passive=True)
            found[name] = queue.declaration_result.message_count or 0
        return found


async def take_dead_letters(amqp_url: str) -> list[aio_pika.abc.AbstractMessage]:
    """Every message in the dead-letter queue, removed from it."""
    return await take(amqp_url, topology.DEAD_LETTER_QUEUE)


async def take(amqp_url: str, queue_name: str) -> list[aio_pika.abc.AbstractMessage]:
    """Every message waiting in ``queue_name``, removed from it."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    taken = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
    return taken


def reason(message: aio_pika.abc.AbstractMessage) -> str:
    return str((message.headers or {}).get(topology.REASON_HEADER, ""))


def body(message: aio_pika.abc.AbstractMessage) -> Any:
    return json.loads(message.body)


def counted(name: str, **labels: str) -> float:
    """The counter ``name`` of this process so far, summed over the samples whose
    labels include ``labels``."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == name
        for sample in metric.samples
        if sample.name == f"{name}_total"
        and all(sample.labels.get(k) == v for k, v in labels.items())
    )


class Undecodable(bytes):
    """A string header whose bytes are not UTF-8, as another client may send;
    publish it after :func:`allow_undecodable`."""


def allow_undecodable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let this process publish :class:`Undecodable` headers, which aio-pika's
    encoder refuses, as AMQP long strings."""
    encode = pamqp.encode.encode_table_value

    def with_undecodable(value: object) -> bytes:
        if isinstance(value, Undecodable):
            return b"S" + struct.pack(">I", len(value)) + bytes(value)
        return encode(value)

    monkeypatch.setattr(pamqp.encode, "encode_table_value", with_undecodable)
