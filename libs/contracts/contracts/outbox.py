"""The transactional outbox: write a message with the rows it describes, publish later.

Writers call :func:`enqueue` inside the transaction that stores their business rows,
so a message exists if and only if those rows were committed. :class:`OutboxRelay`
publishes the rows with publisher confirms and deletes them only once RabbitMQ has
confirmed every one, so a crash at any point can repeat a message but never lose it;
consumers are idempotent for that reason.

Hand-off. A writer in a process with a relay enqueues with ``hand_off=True`` and,
once it has committed, gives the stored rows to that relay
(:meth:`OutboxRelay.hand_off`). The relay publishes them and then deletes them by id:
no claiming transaction is held open across the publishes, and nothing is read back.
Confirmed rows are deleted together, once a batch's worth waits or the oldest has
waited :data:`DELETE_DELAY_SECONDS`, so that a steady trickle of writes does not cost
a statement each. A crash between the confirms and the delete leaves the rows in the
table, where a claim finds them, so a message may be published twice but is never
lost. Such rows send no ``NOTIFY``: nobody else needs to hear of them.

Claims. Rows written by a process without a relay (an operator's command, say) are
claimed: a trigger on the table sends ``NOTIFY notiflow_outbox`` at commit, every
relay hears it and, after a short delay (``outbox_notify_delay_seconds``, once for all
it heard meanwhile), claims the waiting rows that are at least that old. Younger rows
are left to the relay they were handed to, so a busy writer's rows are not published
twice by the others. A sweep every ``outbox_sweep_seconds`` claims rows older than
that period, which no relay holds any more: rows committed while no relay ran, rows
of a relay that stopped or crashed, and anything a lost LISTEN connection missed.
Sweeps keep their period however busy the relay is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import asyncpg
from aio_pika.abc import AbstractRobustConnection
from aiormq.abc import AbstractChannel
from opentelemetry.trace import SpanKind

from contracts import logs, metrics, topology, tracing
from contracts.db import application_name, forget_read_only_sessions
from contracts.messages import CommentCreated, Message
from contracts.settings import Settings, amqp_connection_name
from contracts.tasks import bounded, stop_task

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "notiflow_outbox"

# How long confirmed hand-off rows may wait to be deleted with the ones after them.
# Far below any claim's age, so no other relay takes them meanwhile.
DELETE_DELAY_SECONDS = 0.05

# How long a publish waits for a lost broker connection to come back. A relay
# cut off from the broker then backs off and tries again, claiming no rows
# meanwhile, so that other relays publish them, and measuring its backlog.
READY_SECONDS = 5.0

# Batches of handed-over rows published and waiting for their confirms at once.
# Rows handed over while earlier ones wait go out at once instead of queueing
# behind those confirms, which under load take a few milliseconds each.
MAX_BATCHES_IN_FLIGHT = 4

ROW_FIELDS = (
    "id, exchange, routing_key, message_id, headers, body, priority, created_at"
)

INSERT_SQL = """
INSERT INTO outbox (exchange, routing_key, message_id, headers, body, priority)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::bytea[],
                     $6::smallint[])
"""

# The same insert, for rows the writer hands to its relay: the transaction-local
# setting tells the table's trigger not to NOTIFY the other relays, and the rows come
# back for the hand-off.
HAND_OFF_SQL = f"""
WITH handed AS (SELECT set_config('notiflow.outbox_handoff', 'on', true))
INSERT INTO outbox (exchange, routing_key, message_id, headers, body, priority)
SELECT e, r, m, h, b, p FROM handed,
    unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::bytea[],
           $6::smallint[]) AS t(e, r, m, h, b, p)
RETURNING {ROW_FIELDS}
"""

# Claiming and deleting are one statement: the rows are deleted inside the relay's
# transaction, which commits only once RabbitMQ has confirmed every publish, and rolls
# back (leaving the rows for the next try) if any publish fails. The delete's row locks
# make other relays skip these rows until then. ``= ANY(ARRAY(…))`` runs the claim
# once and deletes by primary key, however large a backlog the planner expects.
#
# Only rows at least ``$2`` seconds old are claimed: younger ones may be in the hands
# of the relay of the process that wrote them.
CLAIM_SQL = f"""
DELETE FROM outbox
WHERE id = ANY(ARRAY(
    SELECT id FROM outbox
    WHERE created_at <= clock_timestamp() - make_interval(secs => $2)
    ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
))
RETURNING {ROW_FIELDS}
"""

# After the hand-off's publishes are confirmed. A row a claim took meanwhile is
# gone already, or locked until that claim commits; either way it is deleted once.
DELETE_SQL = "DELETE FROM outbox WHERE id = ANY($1::bigint[])"


class BrokerUnavailable(Exception):
    """The relay's broker connection is down, and has not come back in time."""


@dataclass(frozen=True)
class Outgoing:
    exchange: str
    routing_key: str
    message_id: str
    message: Message
    priority: int = 0
    headers: Mapping[str, Any] | None = None


def outgoing_event(
    event: CommentCreated, headers: Mapping[str, Any] | None = None
) -> Outgoing:
    """``event`` as the outbox publishes it: to the events exchange, under its
    own id, which its headers carry too (``headers`` adds to them)."""
    event_id = str(event.event_id)
    return Outgoing(
        exchange=topology.EVENTS_EXCHANGE,
        routing_key=topology.COMMENT_CREATED,
        message_id=event_id,
        message=event,
        headers={**(headers or {}), "event_id": event_id},
    )


@dataclass(eq=False)
class _InFlight:
    """A batch of handed-over rows, published, and the task awaiting its confirms."""

    rows: list[Mapping[str, Any]]
    confirms: asyncio.Future[None]


async def enqueue(
    conn: asyncpg.Connection, items: Sequence[Outgoing], *, hand_off: bool = False
) -> list[asyncpg.Record]:
    """Store ``items`` in the outbox, in the caller's transaction.

    With ``hand_off``, the stored rows are returned for the caller to give to its
    relay once the transaction has committed (:meth:`OutboxRelay.hand_off`), and no
    other relay is notified of them. Without it, every relay hears of the commit and
    the rows are claimed; nothing is returned.
    """
    if not items:
        return []
    columns = (
        [i.exchange for i in items],
        [i.routing_key for i in items],
        [i.message_id for i in items],
        [dict(i.headers or {}) for i in items],
        [i.message.to_bytes() for i in items],
        [i.priority for i in items],
    )
    if hand_off:
        return await conn.fetch(HAND_OFF_SQL, *columns)
    await conn.execute(INSERT_SQL, *columns)
    return []


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
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncpg.Connection | None = None
        self._notify_delay = settings.outbox_notify_delay_seconds
        self._notified: asyncio.TimerHandle | None = None
        # Rows handed over by writers in this process, oldest first.
        self._handed: list[Mapping[str, Any]] = []
        self._max_handed = 10 * self._batch
        # Published batches of them whose confirms are awaited, oldest first.
        self._in_flight: deque[_InFlight] = deque()
        # Ids of handed-over rows RabbitMQ has confirmed, still to be deleted, and
        # when they must be (monotonic clock).
        self._confirmed: list[int] = []
        self._delete_by: float | None = None
        # How old the rows must be that the next claim takes, once a sweep, a
        # NOTIFY or :meth:`wake` has asked for one; None while none is due.
        self._claim_age: float | None = None
        # A sweep looks for rows no relay publishes any more: a relay that stopped
        # or fell far behind. Rows a busy relay still holds are younger than this.
        self._orphan_age = max(self._notify_delay, self._sweep)
        self._next_sweep = 0.0
        self._stopping = False
        self.published = 0
        self._measured_at = 0.0

    async def start(self) -> None:
        if self._connection is None:
            url = self._settings.amqp_url
            name = amqp_connection_name(url, "outbox relay")
            self._connection = await aio_pika.connect_robust(
                url, timeout=10, client_properties={"connection_name": name}
            )
            logs.BrokerLink(name).watch(self._connection)
        await self._open_channel()
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def _open_channel(self) -> None:
        assert self._connection is not None
        # A message no queue takes (its queue was deleted while this ran) is
        # refused rather than confirmed, so its row stays to be published again,
        # once the topology is declared anew.
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        await topology.declare(self._channel, self._settings.retry_delay_levels)

    async def _replace_channel(self) -> None:
        """Publish on a new channel, the connection being up and this one closed.

        The broker closes a channel over a refused publish (an exchange deleted,
        the user's permissions taken away); aio-pika tries once to open it again,
        at once, and leaves it closed if that fails too, while the refusal may
        last a little longer. Without a new channel the relay would fail for good.
        """
        if (old := self._channel) is not None:
            # Closed for good, so that nothing reopens it beside the new one.
            await bounded(old.close(), "closing the relay's lost channel")
        await self._open_channel()
        logger.info(
            "the broker had closed the outbox relay's channel; it publishes on a "
            "new one",
            extra={"action": "outbox.channel_replaced"},
        )

    async def stop(self) -> None:
        self._stopping = True
        if self._notified is not None:
            self._notified.cancel()
        if self._task:
            await stop_task(self._task, "the outbox relay")
        try:
            async with asyncio.timeout(2):
                # Rows whose confirms never come stay in the table for a sweep.
                await self._settle_in_flight(wait=True, raise_failure=False)
                await self._delete_confirmed(now=True)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            # The rows stay, and another relay's sweep publishes them again.
            logger.warning(
                "could not delete %d published outbox rows: %r",
                len(self._confirmed),
                exc,
                extra={"action": "outbox.delete_failed"},
            )
        finally:
            unconfirmed = [batch.confirms for batch in self._in_flight]
            for confirms in unconfirmed:
                confirms.cancel()
            await asyncio.gather(*unconfirmed, return_exceptions=True)
        await self._close_listener()
        if self._owns_connection and self._connection:
            await bounded(self._connection.close(), "closing the relay's connection")
        elif self._channel is not None:
            await bounded(self._channel.close(), "closing the relay's channel")

    @property
    def connection(self) -> AbstractRobustConnection | None:
        return self._connection

    def wake(self) -> None:
        """Claim and publish every waiting row soon, however young."""
        self._claim(0.0)

    def hand_off(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Publish ``rows``, which :func:`enqueue` stored with ``hand_off=True`` in a
        transaction that has committed, then delete them. A row is the outbox
        table's columns by name, as :data:`ROW_FIELDS` lists them."""
        room = self._max_handed - len(self._handed)
        if rows and room > 0:
            # Beyond the limit (a broker outage, say) rows stay in the table only,
            # and a sweep publishes them once the relay catches up.
            self._handed.extend(rows[:room])
            self._wake.set()

    def _claim(self, min_age: float) -> None:
        if self._claim_age is None or min_age < self._claim_age:
            self._claim_age = min_age
        self._wake.set()

    async def _listen(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            self._listener = await asyncpg.connect(
                self._settings.database_url,
                timeout=5,
                server_settings=application_name("outbox listener"),
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
            self._claim(0.0)
        elif self._notified is None:
            # A little later than the age the claim asks for, so that the rows
            # whose commit was announced are old enough by then.
            self._notified = asyncio.get_running_loop().call_later(
                self._notify_delay * 1.1 + 0.01, self._after_notify
            )

    def _after_notify(self) -> None:
        self._notified = None
        self._claim(self._notify_delay)

    async def _close_listener(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            try:
                await asyncio.wait_for(listener.close(), timeout=2)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                listener.terminate()

    async def _run(self) -> None:
        failures = 0
        self._next_sweep = time.monotonic() + self._sweep
        while not self._stopping:
            await self._listen()
            # Not ``wait_for``: on Python 3.11 it returns the result, and drops the
            # cancellation, when :meth:`stop` cancels just as a wake-up arrives, and
            # the relay would then never stop.
            wait = self._next_sweep - time.monotonic()
            if self._delete_by is not None:
                wait = min(wait, self._delete_by - time.monotonic())
            try:
                async with asyncio.timeout(max(wait, 0.0)):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + self._sweep
                self._claim(self._orphan_age)
            try:
                if time.monotonic() - self._measured_at >= self._sweep:
                    # Measured before publishing and whether or not publishing
                    # works, so that an outage shows as a growing backlog.
                    await self._measure_backlog()
                self._wake.clear()
                claiming = self._claim_age is not None
                await self._publish_handed(wait=claiming)
                # Before a claim, which could otherwise take them once more.
                await self._delete_confirmed(now=claiming)
                if (age := self._claim_age) is not None:
                    self._claim_age = None
                    try:
                        await self.drain(age)
                    except BaseException:
                        self._claim(age)
                        raise
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    # A library may turn the cancellation of a publish in flight
                    # into a TimeoutError; stopping wins over retrying.
                    return
                failures += 1
                metrics.OUTBOX_PUBLISH_FAILURES.inc()
                await forget_read_only_sessions(self._pool, exc)
                delay = min(0.2 * 2**failures, 5.0)
                logger.log(
                    # The connection's loss is logged once, where it is watched.
                    logging.DEBUG
                    if isinstance(exc, BrokerUnavailable)
                    else logging.WARNING,
                    "outbox publish failed, retrying in %.1fs: %r",
                    delay,
                    exc,
                    extra={"action": "outbox.publish_failed"},
                )
                await asyncio.sleep(delay)
                if isinstance(exc, aio_pika.exceptions.PublishError):
                    await self._restore_topology()
                self._wake.set()

    async def _restore_topology(self) -> None:
        """Declare again the queue no message could reach, and the rest."""
        try:
            if self._channel is not None:
                await topology.declare(self._channel, self._settings.retry_delay_levels)
        except Exception as exc:
            logger.warning(
                "could not declare the topology again: %r",
                exc,
                extra={"action": "outbox.declare_failed"},
            )

    async def drain(self, min_age: float = 0.0) -> int:
        """Claim and publish the rows at least ``min_age`` seconds old until none
        is left; return how many were published."""
        total = 0
        while True:
            count = await self._publish_batch(min_age)
            total += count
            if count < self._batch:
                return total

    async def _publish_handed(self, *, wait: bool = False) -> None:
        """Publish what writers handed over, a batch at a time, without waiting
        for earlier batches' confirms; note each confirmed batch for deletion.

        With ``wait``, return only once every batch in flight is confirmed. Up to
        :data:`MAX_BATCHES_IN_FLIGHT` batches wait for confirms at once; a batch
        that fails goes back to the front of the handed-over rows and its error
        is raised, so the relay backs off and publishes it again.
        """
        await self._settle_in_flight()
        while self._handed and len(self._in_flight) < MAX_BATCHES_IN_FLIGHT:
            rows = self._handed[: self._batch]
            del self._handed[: self._batch]
            # A task per batch, started now: its publishes are written in this
            # turn of the loop, in the order the rows were handed over.
            confirms = asyncio.ensure_future(self._publish_all(rows))
            confirms.add_done_callback(lambda _: self._wake.set())
            self._in_flight.append(_InFlight(rows, confirms))
        await self._settle_in_flight(wait=wait)
        await self._delete_confirmed()

    async def _settle_in_flight(
        self, *, wait: bool = False, raise_failure: bool = True
    ) -> None:
        """Take the batches in flight whose confirms have come (all, with
        ``wait``): confirmed rows await deletion, failed ones are handed back."""
        if wait and self._in_flight:
            await asyncio.wait([batch.confirms for batch in self._in_flight])
        failure: BaseException | None = None
        waiting: deque[_InFlight] = deque()
        failed: list[Mapping[str, Any]] = []
        for batch in self._in_flight:
            if not batch.confirms.done():
                waiting.append(batch)
            elif batch.confirms.cancelled() or batch.confirms.exception() is not None:
                failed.extend(batch.rows)
                if failure is None and not batch.confirms.cancelled():
                    failure = batch.confirms.exception()
            else:
                self._confirmed.extend(row["id"] for row in batch.rows)
                if self._delete_by is None:
                    self._delete_by = time.monotonic() + DELETE_DELAY_SECONDS
                self._published(batch.rows)
        self._in_flight = waiting
        if failed:
            # Tried again, in the order they were handed over, after the back-off.
            failed.sort(key=lambda row: row["id"])
            self._handed[:0] = failed
            if raise_failure:
                raise failure or RuntimeError("publishing handed-over rows stopped")

    async def _delete_confirmed(self, *, now: bool = False) -> None:
        """Delete the confirmed rows if a batch's worth waits, the oldest has
        waited long enough, or ``now``."""
        while self._confirmed and (
            now
            or len(self._confirmed) >= self._batch
            or time.monotonic() >= (self._delete_by or 0.0)
        ):
            ids = self._confirmed[: self._batch]
            async with self._pool.acquire(timeout=5) as conn:
                await conn.execute(DELETE_SQL, ids)
            del self._confirmed[: len(ids)]
            if not self._confirmed:
                self._delete_by = None

    async def _publish_batch(self, min_age: float = 0.0) -> int:
        # The broker first: a claim's rows stay locked until they are published,
        # and a relay without a broker would keep them from every other relay.
        channel = await self._underlay()
        async with self._pool.acquire(timeout=5) as conn, conn.transaction():
            rows = await conn.fetch(CLAIM_SQL, self._batch, min_age)
            if not rows:
                return 0
            # RETURNING keeps no order; publish in the order the rows were written.
            rows.sort(key=lambda row: row["id"])
            await self._publish_all(rows, channel)
        claimed = {row["id"] for row in rows}
        if self._handed:
            # Handed-over rows this claim took (a relay that fell behind) are
            # published; do not publish them again.
            self._handed = [row for row in self._handed if row["id"] not in claimed]
        self._published(rows)
        return len(rows)

    async def _underlay(self) -> AbstractChannel:
        """The channel to publish on, once the broker connection is up; raise
        :class:`BrokerUnavailable` if it is not within :data:`READY_SECONDS`."""
        if self._channel is None:
            raise RuntimeError("relay is not started")
        try:
            async with asyncio.timeout(READY_SECONDS):
                try:
                    # Once the connection is up.
                    return await self._channel.get_underlay_channel()
                except aiormq.exceptions.ChannelInvalidStateError:
                    await self._replace_channel()
                    assert self._channel is not None
                    return await self._channel.get_underlay_channel()
        except TimeoutError:
            raise BrokerUnavailable(
                f"the broker connection has been down for {READY_SECONDS:g}s"
            ) from None

    async def _publish_all(
        self, rows: Sequence[Mapping[str, Any]], channel: AbstractChannel | None = None
    ) -> None:
        started = time.perf_counter()
        channel = channel or await self._underlay()
        await asyncio.gather(*(self._publish(channel, row) for row in rows))
        logger.debug(
            "published %d outbox messages in %.1f ms",
            len(rows),
            (time.perf_counter() - started) * 1000,
            extra={"action": "outbox.published"},
        )

    def _published(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.published += len(rows)
        metrics.OUTBOX_PUBLISHED.inc(len(rows))

    async def _publish(self, channel: AbstractChannel, row: Mapping[str, Any]) -> None:
        # aiormq's channel, not aio-pika's exchange: ``wait=False`` queues the frame
        # and returns to wait for the confirm, where aio-pika would first wait, under
        # the channel's lock, for the frame to be written out. That wait made a
        # batch's publishes go out one per turn of the event loop, each confirmed
        # on its own; without it a batch reaches RabbitMQ together and is confirmed
        # together, for about half the CPU per publish on both ends
        # (bench/amqp_writes.py). The confirm is still what the row waits for.
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
            await channel.basic_publish(
                message.body,
                exchange=row["exchange"],
                routing_key=row["routing_key"],
                properties=message.properties,
                mandatory=True,
                timeout=10,
                wait=False,
            )

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
