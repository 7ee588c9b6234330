"""The transactional outbox: write a message with the rows it describes, publish later.

Writers call :func:`enqueue` inside the transaction that stores their business rows,
so a message exists if and only if those rows were committed. :class:`OutboxRelay`
publishes the rows with publisher confirms and deletes them only once RabbitMQ has
confirmed every one, so a crash at any point can repeat a message but never lose it;
consumers are idempotent for that reason.

A writer wakes the relay of its own process as soon as it commits
(:meth:`OutboxRelay.wake`). Every relay also hears ``NOTIFY notiflow_outbox`` (a
trigger on the table fires at commit), for rows written by a process without a relay
of its own or whose relay is gone; since the writer's relay is normally publishing
them already, a relay answers a notification only after a short delay, once for all
it heard meanwhile, so that N relays do not all race for every commit. A sweep on a
timer covers a lost LISTEN connection, rows committed while no relay ran, and a
batch that failed to publish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractRobustConnection
from opentelemetry.trace import SpanKind

from contracts import metrics, topology, tracing
from contracts.messages import Message
from contracts.settings import Settings

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "notiflow_outbox"

INSERT_SQL = """
INSERT INTO outbox (exchange, routing_key, message_id, headers, body, priority)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::bytea[],
                     $6::smallint[])
"""

# Claiming and deleting are one statement: the rows are deleted inside the relay's
# transaction, which commits only once RabbitMQ has confirmed every publish, and rolls
# back (leaving the rows for the next try) if any publish fails. The delete's row locks
# make other relays skip these rows until then. ``= ANY(ARRAY(…))`` runs the claim
# once and deletes by primary key, however large a backlog the planner expects.
CLAIM_SQL = """
DELETE FROM outbox
WHERE id = ANY(ARRAY(
    SELECT id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
))
RETURNING id, exchange, routing_key, message_id, headers, body, priority, created_at
"""


@dataclass(frozen=True)
class Outgoing:
    exchange: str
    routing_key: str
    message_id: str
    message: Message
    priority: int = 0
    headers: Mapping[str, Any] | None = None


async def enqueue(conn: asyncpg.Connection, items: Sequence[Outgoing]) -> None:
    """Store ``items`` in the outbox, in the caller's transaction."""
    if not items:
        return
    await conn.execute(
        INSERT_SQL,
        [i.exchange for i in items],
        [i.routing_key for i in items],
        [i.message_id for i in items],
        [dict(i.headers or {}) for i in items],
        [i.message.to_bytes() for i in items],
        [i.priority for i in items],
    )


class OutboxRelay:
    """Publishes outbox rows to RabbitMQ; many relays may run side by side."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        *,
        batch_size: int | None = None,
        sweep_seconds: float | None = None,
        connection: AbstractRobustConnection | None = None,
    ) -> None:
        """``connection``, when given, is borrowed: the relay opens its own channel
        on it and leaves closing it to its owner."""
        self._pool = pool
        self._settings = settings
        self._batch = batch_size or settings.outbox_batch_size
        self._sweep = sweep_seconds or settings.outbox_sweep_seconds
        self._wake = asyncio.Event()
        self._connection = connection
        self._owns_connection = connection is None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncpg.Connection | None = None
        self._notify_delay = settings.outbox_notify_delay_seconds
        self._notified: asyncio.TimerHandle | None = None
        self._stopping = False
        self.published = 0
        self._measured_at = 0.0

    async def start(self) -> None:
        if self._connection is None:
            self._connection = await aio_pika.connect_robust(
                self._settings.amqp_url, timeout=10
            )
        self._channel = await self._connection.channel(publisher_confirms=True)
        await topology.declare(self._channel, self._settings.retry_delay_levels)
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        self._stopping = True
        if self._notified is not None:
            self._notified.cancel()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close_listener()
        if self._owns_connection and self._connection:
            await self._connection.close()
        elif self._channel is not None:
            await self._channel.close()

    @property
    def connection(self) -> AbstractRobustConnection | None:
        return self._connection

    def wake(self) -> None:
        """Publish soon. A writer in this process calls it after committing outbox
        rows, so the relay need not wait for the NOTIFY to come back round."""
        self._wake.set()

    async def _listen(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            self._listener = await asyncpg.connect(
                self._settings.database_url, timeout=5
            )
            await self._listener.add_listener(NOTIFY_CHANNEL, self._on_notify)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            logger.warning(
                "outbox listener unavailable, sweeping only: %r",
                exc,
                extra={"action": "outbox.listen_failed"},
            )
            self._listener = None

    def _on_notify(self, *_: object) -> None:
        if self._notify_delay <= 0:
            self._wake.set()
        elif self._notified is None:
            self._notified = asyncio.get_running_loop().call_later(
                self._notify_delay, self._after_notify
            )

    def _after_notify(self) -> None:
        self._notified = None
        self._wake.set()

    async def _close_listener(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            try:
                await asyncio.wait_for(listener.close(), timeout=2)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                listener.terminate()

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            await self._listen()
            # Not ``wait_for``: on Python 3.11 it returns the result, and drops the
            # cancellation, when :meth:`stop` cancels just as a wake-up arrives, and
            # the relay would then never stop.
            try:
                async with asyncio.timeout(self._sweep):
                    await self._wake.wait()
            except TimeoutError:
                pass
            try:
                if time.monotonic() - self._measured_at >= self._sweep:
                    # Measured before publishing and whether or not publishing
                    # works, so that an outage shows as a growing backlog.
                    await self._measure_backlog()
                await self.drain()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    # A library may turn the cancellation of a publish in flight
                    # into a TimeoutError; stopping wins over retrying.
                    return
                failures += 1
                delay = min(0.2 * 2**failures, 5.0)
                logger.warning(
                    "outbox publish failed, retrying in %.1fs: %r",
                    delay,
                    exc,
                    extra={"action": "outbox.publish_failed"},
                )
                await asyncio.sleep(delay)
                self._wake.set()

    async def drain(self) -> int:
        """Publish until the outbox is empty; return how many were published."""
        total = 0
        while True:
            count = await self._publish_batch()
            total += count
            if count < self._batch:
                return total

    async def _exchange(self, name: str) -> aio_pika.abc.AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            if self._channel is None:
                raise RuntimeError("relay is not started")
            exchange = await self._channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def _publish_batch(self) -> int:
        async with self._pool.acquire(timeout=5) as conn, conn.transaction():
            # A wake-up is cleared here, not when the relay wakes: every commit
            # signalled until now is in the snapshot of the claim sent next, so the
            # signals that arrive while the relay gets a connection count as served,
            # and only those that arrive after the claim was sent cause another.
            self._wake.clear()
            rows = await conn.fetch(CLAIM_SQL, self._batch)
            if not rows:
                return 0
            started = time.perf_counter()
            # RETURNING keeps no order; publish in the order the rows were written.
            rows.sort(key=lambda row: row["id"])
            await asyncio.gather(*(self._publish(row) for row in rows))
        self.published += len(rows)
        metrics.OUTBOX_PUBLISHED.inc(len(rows))
        logger.debug(
            "published %d outbox messages in %.1f ms",
            len(rows),
            (time.perf_counter() - started) * 1000,
            extra={"action": "outbox.published"},
        )
        return len(rows)

    async def _publish(self, row: asyncpg.Record) -> None:
        exchange = await self._exchange(row["exchange"])
        with tracing.span(
            f"publish {row['routing_key']}",
            parent_headers=row["headers"],
            kind=SpanKind.PRODUCER,
        ):
            message = aio_pika.Message(
                body=bytes(row["body"]),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=row["message_id"],
                priority=row["priority"],
                headers=tracing.inject(row["headers"]),
                timestamp=row["created_at"],
            )
            await exchange.publish(message, routing_key=row["routing_key"], timeout=10)

    async def _measure_backlog(self) -> None:
        self._measured_at = time.monotonic()
        async with self._pool.acquire(timeout=5) as conn:
            count, oldest = await backlog(conn)
        metrics.OUTBOX_BACKLOG.set(count)
        metrics.OUTBOX_OLDEST_AGE.set(oldest)


async def backlog(conn: asyncpg.Connection) -> tuple[int, float]:
    """How many rows wait in the outbox, and the age of the oldest in seconds."""
    count, oldest = await conn.fetchrow(
        "SELECT count(*), extract(epoch FROM clock_timestamp() - min(created_at)) "
        "FROM outbox"
    )
    return int(count), float(oldest or 0.0)
