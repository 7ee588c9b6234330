"""Fixtures for the push sender against the real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import aio_pika
import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI

from contracts import topology
from contracts.auth import issue_token
from contracts.messages import DeliveryBatch, DeliveryRequested
from contracts.settings import Settings
from push_sender.app import create_app
from push_sender.settings import PushSettings
from push_sender.vapid import b64url, public_point
from tests.support.data import Demo, seed_demo
from tests.support.push_service import PushService


@dataclass(frozen=True)
class VapidPair:
    pem: str
    public: str


@pytest.fixture(scope="session")
def vapid_pair() -> VapidPair:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return VapidPair(pem, b64url(public_point(key.public_key())))


@pytest.fixture
async def demo(settings: Settings) -> Demo:
    return await seed_demo(settings.database_url)


@pytest.fixture
async def push_service(vapid_pair: VapidPair) -> AsyncIterator[PushService]:
    async with PushService(vapid_pair.public) as service:
        yield service


@pytest.fixture
def push_settings(settings: Settings, vapid_pair: VapidPair) -> PushSettings:
    return PushSettings(
        **settings.model_dump(),
        vapid_private_key=vapid_pair.pem,
        vapid_public_key=vapid_pair.public,
        vapid_subject="mailto:ops@example.com",
        push_allowed_hosts="127.0.0.1",
        push_ttl_seconds=3600,
        push_sweep_seconds=0.3,
    )


@pytest.fixture
async def push_app(push_settings: PushSettings) -> AsyncIterator[FastAPI]:
    app = create_app(push_settings)
    async with app.router.lifespan_context(app):
        yield app


class FakeDNS:
    """Answers look-ups from a table, so that no test asks a real resolver.

    A name missing from ``records`` does not exist; one in ``slow`` never answers.
    ``during_lookup``, when set, runs inside each look-up, to change the world
    while the server waits for an answer.
    """

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.slow: set[str] = set()
        self.asked: list[str] = []
        self.during_lookup: Callable[[], Awaitable[object]] | None = None

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if self.during_lookup is not None:
            await self.during_lookup()
        if host in self.slow:
            await asyncio.Event().wait()
        if host not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.records[host])


@pytest.fixture
def dns() -> FakeDNS:
    return FakeDNS()


@pytest.fixture
async def dns_push_app(
    push_settings: PushSettings, dns: FakeDNS
) -> AsyncIterator[FastAPI]:
    """The sender with no allow-list, every endpoint host resolved by ``dns``."""
    settings = push_settings.model_copy(
        update={"push_allowed_hosts": "", "push_resolve_timeout": 0.5}
    )
    app = create_app(settings, resolve=dns)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def dns_api(dns_push_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=dns_push_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://push") as c:
        yield c


@pytest.fixture
async def api(push_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=push_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://push") as c:
        yield c


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(settings.database_url)
    await conn.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )
    try:
        yield conn
    finally:
        await conn.close()


def auth(settings: Settings, user_id: int) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(user_id, 'x', settings)}"}


async def settled(db: asyncpg.Connection, row_id: int) -> asyncpg.Record | None:
    """The notification row once it has an outcome, else None."""
    row = await db.fetchrow(
        "SELECT status, attempts, last_error, metadata, next_attempt_at "
        "FROM notifications WHERE id = $1",
        row_id,
    )
    return row if row["status"] in ("sent", "skipped", "failed") else None


async def notify(
    settings: Settings,
    db: asyncpg.Connection,
    user_id: int,
    *,
    title: str = "Carol mentioned you",
    message: str = "Have a look, @bob.",
    priority: int = 7,
    post_id: int = 42,
    publish: bool = True,
) -> int:
    """A pending push row, as the dispatcher writes it, and its delivery message."""
    event_id = uuid.uuid4()
    now = datetime.now(UTC)
    await db.execute(
        "INSERT INTO events (id, type, payload, occurred_at) "
        "VALUES ($1, 'comment.created', '{}', $2)",
        event_id,
        now,
    )
    metadata = {"post_id": post_id, "url": f"http://page/?post={post_id}#comment-1"}
    row_id: int = await db.fetchval(
        "INSERT INTO notifications (event_id, user_id, title, message, type, "
        "channel, priority, metadata, event_occurred_at) "
        "VALUES ($1, $2, $3, $4, 'push', 'comment.mention', $5, $6, $7) RETURNING id",
        event_id,
        user_id,
        title,
        message,
        priority,
        metadata,
        now,
    )
    if publish:
        await redeliver(settings, db, row_id)
    return row_id


async def redeliver(settings: Settings, db: asyncpg.Connection, row_id: int) -> None:
    """Publish the delivery message of a stored row (again)."""
    delivery = await delivery_of(db, row_id)
    await _publish(settings, delivery.to_bytes(), delivery.priority)


async def deliver_together(
    settings: Settings, db: asyncpg.Connection, row_ids: list[int]
) -> None:
    """Publish the rows' deliveries in one envelope, as the dispatcher does."""
    deliveries = [await delivery_of(db, row_id) for row_id in row_ids]
    batch = DeliveryBatch(deliveries=deliveries)
    await _publish(settings, batch.to_bytes(), deliveries[0].priority)


async def delivery_of(db: asyncpg.Connection, row_id: int) -> DeliveryRequested:
    row = await db.fetchrow(
        "SELECT event_id, user_id, priority, event_occurred_at FROM notifications "
        "WHERE id = $1",
        row_id,
    )
    return DeliveryRequested(
        notification_id=row_id,
        event_id=row["event_id"],
        user_id=row["user_id"],
        type="push",
        channel="comment.mention",
        priority=row["priority"],
        event_occurred_at=row["event_occurred_at"],
    )


async def _publish(settings: Settings, body: bytes, priority: int) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.DELIVERIES_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(body, priority=priority), routing_key="push"
        )
