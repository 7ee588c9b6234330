"""The outbox relay against the real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import pytest
from aiormq.abc import AbstractChannel
from prometheus_client import REGISTRY

from contracts import topology
from contracts.db import create_pool
from contracts.messages import CommentCreated, decode
from contracts.outbox import OutboxRelay, Outgoing, backlog, enqueue
from contracts.settings import Settings
from tests.integration.proxy import Proxy
from tests.support import infra
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


def event(n: int) -> Outgoing:
    message = CommentCreated(
        event_id=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
        comment_id=n,
        post_id=1,
        author_id=1,
        body=f"comment {n}",
    )
    return Outgoing(
        exchange=topology.EVENTS_EXCHANGE,
        routing_key=topology.COMMENT_CREATED,
        message_id=str(message.event_id),
        message=message,
        headers={"event_id": str(message.event_id)},
    )


async def write(pool: asyncpg.Pool, items: list[Outgoing]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await enqueue(conn, items)


def count_claims(relay: OutboxRelay) -> list[float]:
    """The age limit of every claim ``relay`` makes from now on, in order."""
    claims: list[float] = []
    publish_batch = relay._publish_batch

    async def counted(min_age: float = 0.0) -> int:
        claims.append(min_age)
        return await publish_batch(min_age)

    relay._publish_batch = counted  # type: ignore[method-assign]
    return claims


async def received(settings: Settings) -> list[int]:
    connection = await aio_pika.connect(settings.amqp_url)
    found = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.DISPATCHER_QUEUE, passive=True)
        while (message := await queue.get(fail=False)) is not None:
            found.append(decode(CommentCreated, message.body).comment_id)
            await message.ack()
    return found


async def test_rows_written_while_no_relay_runs_are_published_on_start(
    settings: Settings,
) -> None:
    pool = await create_pool(settings)
    relay = OutboxRelay(pool, settings, batch_size=7)
    try:
        # Declares the topology; then stop, and write while nothing publishes.
        await relay.start()
        await relay.stop()
        await write(pool, [event(n) for n in range(20)])
        async with pool.acquire() as conn:
            assert (await backlog(conn))[0] == 20

        relay = OutboxRelay(pool, settings, batch_size=7)
        await relay.start()
        got: list[int] = []

        async def all_twenty() -> bool:
            got.extend(await received(settings))
            return len(got) >= 20

        await eventually(all_twenty, what="20 messages on the queue")
    finally:
        await relay.stop()
        async with pool.acquire() as conn:
            left = (await backlog(conn))[0]
        await pool.close()

    assert sorted(got) == list(range(20)), "every row once, in batches of 7"
    assert left == 0


async def test_a_commit_wakes_the_relay_without_waiting_for_a_sweep(
    settings: Settings,
) -> None:
    slow_sweep = settings.model_copy(update={"outbox_sweep_seconds": 3600})
    pool = await create_pool(slow_sweep)
    relay = OutboxRelay(pool, slow_sweep)
    try:
        await relay.start()
        await eventually(lambda: _listening(relay), what="relay listening", timeout=10)

        await write(pool, [event(1)])

        got = await eventually(
            lambda: received(settings), what="the message", timeout=10
        )
    finally:
        await relay.stop()
        await pool.close()

    assert got == [1]


async def test_a_burst_of_commits_elsewhere_is_answered_with_one_claim(
    settings: Settings,
) -> None:
    # The delay is long enough that the twenty commits land inside it even on a
    # machine busy enough to take a second over them.
    patient = settings.model_copy(
        update={"outbox_sweep_seconds": 3600, "outbox_notify_delay_seconds": 2.0}
    )
    pool = await create_pool(patient)
    relay = OutboxRelay(pool, patient)
    claims = count_claims(relay)
    try:
        await relay.start()
        await eventually(lambda: _listening(relay), what="relay listening", timeout=10)
        claims.clear()
        # Twenty commits from another process, each with its own NOTIFY.
        for number in range(20):
            await write(pool, [event(number)])

        got: list[int] = []

        async def all_twenty() -> bool:
            got.extend(await received(settings))
            return len(got) >= 20

        await eventually(all_twenty, what="twenty messages", timeout=10)
    finally:
        await relay.stop()
        await pool.close()

    assert sorted(got) == list(range(20))
    # One claim takes the burst (and a second finds the rest or nothing),
    # instead of a claim per notification.
    assert 1 <= len(claims) <= 3, claims


async def _listening(relay: OutboxRelay) -> bool:
    listener = relay._listener  # the relay opens it on its first loop
    return listener is not None and not listener.is_closed()


async def test_a_rolled_back_transaction_publishes_nothing(settings: Settings) -> None:
    pool = await create_pool(settings)
    relay = OutboxRelay(pool, settings)
    try:
        await relay.start()
        with pytest.raises(RuntimeError):
            async with pool.acquire() as conn, conn.transaction():
                await enqueue(conn, [event(1)])
                raise RuntimeError("the business write failed")
        await write(pool, [event(2)])

        got = await eventually(lambda: received(settings), what="a message")
    finally:
        await relay.stop()
        await pool.close()

    assert got == [2]


async def _without_notify(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute("ALTER TABLE outbox DISABLE TRIGGER outbox_wake")


async def test_a_wake_from_a_writer_in_the_process_publishes_without_a_sweep(
    settings: Settings,
) -> None:
    slow_sweep = settings.model_copy(update={"outbox_sweep_seconds": 3600})
    pool = await create_pool(slow_sweep)
    relay = OutboxRelay(pool, slow_sweep)
    try:
        # No NOTIFY reaches the relay: only the writer's own wake can.
        await _without_notify(pool)
        await relay.start()

        await write(pool, [event(1)])
        relay.wake()

        got = await eventually(
            lambda: received(settings), what="the message", timeout=10
        )
    finally:
        await relay.stop()
        await pool.close()

    assert got == [1]


class HeldRelay(OutboxRelay):
    """A relay that stops before its first publish until the test lets it go on."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        super().__init__(pool, settings)
        self.publishing = asyncio.Event()
        self.go_on = asyncio.Event()

    async def _publish(self, channel: AbstractChannel, row: asyncpg.Record) -> None:
        self.publishing.set()
        await self.go_on.wait()
        await super()._publish(channel, row)


async def test_a_wake_while_the_relay_publishes_is_served_without_a_sweep(
    settings: Settings,
) -> None:
    slow_sweep = settings.model_copy(update={"outbox_sweep_seconds": 3600})
    pool = await create_pool(slow_sweep)
    relay = HeldRelay(pool, slow_sweep)
    try:
        await _without_notify(pool)
        await relay.start()
        await write(pool, [event(1)])
        relay.wake()
        await asyncio.wait_for(relay.publishing.wait(), timeout=10)

        # Committed after the relay took its batch: the claim in flight cannot
        # have seen it, so this wake must cause another.
        await write(pool, [event(2)])
        relay.wake()
        relay.go_on.set()

        got: list[int] = []

        async def both() -> bool:
            got.extend(await received(settings))
            return len(got) >= 2

        await eventually(both, what="both messages", timeout=10)
    finally:
        await relay.stop()
        await pool.close()

    assert sorted(got) == [1, 2]


async def test_a_relay_woken_as_it_is_stopped_still_stops(settings: Settings) -> None:
    slow_sweep = settings.model_copy(update={"outbox_sweep_seconds": 3600})
    pool = await create_pool(slow_sweep)
    try:
        # The wake-up lands at each of the first few steps of the event loop
        # before the cancellation does.
        for steps in range(4):
            relay = OutboxRelay(pool, slow_sweep)
            await relay.start()
            await eventually(lambda r=relay: _listening(r), what="relay listening")

            relay.wake()
            for _ in range(steps):
                await asyncio.sleep(0)
            try:
                await asyncio.wait_for(relay.stop(), timeout=10)
            except TimeoutError:
                pytest.fail(f"the relay did not stop, woken {steps} steps before")
    finally:
        await pool.close()


async def test_a_relay_stops_when_a_publish_turns_its_cancellation_into_a_timeout(
    settings: Settings,
) -> None:
    slow_sweep = settings.model_copy(update={"outbox_sweep_seconds": 3600})
    pool = await create_pool(slow_sweep)
    relay = OutboxRelay(pool, slow_sweep)
    publishing = asyncio.Event()

    async def stubborn(_channel: object, _row: object) -> None:
        # What a client library does when cancelled inside its own timeout.
        publishing.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise TimeoutError() from None

    relay._publish = stubborn  # type: ignore[method-assign]
    try:
        await write(pool, [event(1)])
        await relay.start()
        relay.wake()
        await asyncio.wait_for(publishing.wait(), timeout=10)
        try:
            await asyncio.wait_for(relay.stop(), timeout=10)
        except TimeoutError:
            pytest.fail("the relay kept retrying instead of stopping")
    finally:
        await pool.close()


async def test_a_publish_that_times_out_counts_on_the_metrics_and_is_tried_again(
    settings: Settings,
) -> None:
    slow_sweep = settings.model_copy(update={"outbox_sweep_seconds": 3600})
    pool = await create_pool(slow_sweep)
    relay = OutboxRelay(pool, slow_sweep)
    real_publish = relay._publish
    tries: list[int] = []

    async def timing_out_once(channel: object, row: object) -> None:
        # No confirm in time, as over a slow link to the broker.
        tries.append(1)
        if len(tries) == 1:
            raise TimeoutError
        await real_publish(channel, row)  # type: ignore[arg-type]

    def failures() -> float:
        return REGISTRY.get_sample_value("notiflow_outbox_publish_failures_total") or 0

    relay._publish = timing_out_once  # type: ignore[method-assign]
    before = failures()
    try:
        await _without_notify(pool)
        await write(pool, [event(1)])
        await relay.start()
        relay.wake()

        async def emptied() -> bool:
            async with pool.acquire() as conn:
                return await conn.fetchval("SELECT count(*) FROM outbox") == 0

        await eventually(emptied, what="the row published on its second try")
    finally:
        await relay.stop()
        await pool.close()

    assert failures() == before + 1
    assert len(tries) == 2


async def test_rows_stay_in_the_outbox_until_every_publish_is_confirmed(
    settings: Settings,
) -> None:
    slow_sweep = settings.model_copy(update={"outbox_sweep_seconds": 3600})
    pool = await create_pool(slow_sweep)
    relay = OutboxRelay(pool, slow_sweep)
    try:
        await _without_notify(pool)
        await relay.start()
        delivered = event(1)
        lost = replace(event(2), exchange="no-such-exchange")
        await write(pool, [delivered, lost])

        # RabbitMQ refuses the second publish; the first may have been confirmed.
        with pytest.raises(aio_pika.exceptions.ChannelClosed):
            await relay.drain()

        async with pool.acquire() as conn:
            left = await conn.fetch("SELECT message_id FROM outbox ORDER BY id")
    finally:
        await relay.stop()
        await pool.close()

    assert [r["message_id"] for r in left] == [delivered.message_id, lost.message_id]


async def test_relays_side_by_side_publish_every_row_once(settings: Settings) -> None:
    pool = await create_pool(settings)
    relays = [OutboxRelay(pool, settings, batch_size=5) for _ in range(3)]
    got: list[int] = []

    async def all_of_them() -> bool:
        got.extend(await received(settings))
        return len(got) >= 120

    try:
        for relay in relays:
            await relay.start()
        for start in range(0, 120, 10):
            await write(pool, [event(n) for n in range(start, start + 10)])

        await eventually(all_of_them, what="120 messages on the queue")
    finally:
        for relay in relays:
            await relay.stop()
        await pool.close()

    assert sorted(got) == list(range(120))
    assert sum(relay.published for relay in relays) == 120


async def hand_over(pool: asyncpg.Pool, items: list[Outgoing]) -> list[asyncpg.Record]:
    async with pool.acquire() as conn, conn.transaction():
        return await enqueue(conn, items, hand_off=True)


async def outbox_ids(pool: asyncpg.Pool) -> list[int]:
    async with pool.acquire() as conn:
        return [r["id"] for r in await conn.fetch("SELECT id FROM outbox ORDER BY id")]


async def test_rows_handed_over_are_published_and_deleted_without_a_claim(
    settings: Settings,
) -> None:
    slow_sweep = settings.model_copy(update={"outbox_sweep_seconds": 3600})
    pool = await create_pool(slow_sweep)
    relay = OutboxRelay(pool, slow_sweep)
    claims = count_claims(relay)
    try:
        await relay.start()
        rows = await hand_over(pool, [event(n) for n in range(5)])
        relay.hand_off(rows)

        got: list[int] = []

        async def all_five() -> bool:
            got.extend(await received(settings))
            return len(got) >= 5

        await eventually(all_five, what="five messages")
        await eventually(
            lambda: _empty(pool), what="the handed rows deleted", timeout=10
        )
    finally:
        await relay.stop()
        await pool.close()

    assert got == list(range(5))
    assert claims == []


async def _empty(pool: asyncpg.Pool) -> bool:
    return await outbox_ids(pool) == []


async def test_rows_handed_over_wake_no_other_relay(settings: Settings) -> None:
    pool = await create_pool(settings)
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(settings.database_url)
    await listener.add_listener(
        "notiflow_outbox", lambda *args: heard.put_nowait(args[-1])
    )
    try:
        await hand_over(pool, [event(1)])
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(heard.get(), timeout=0.5)

        # The setting lasted only for the handing transaction.
        await write(pool, [event(2)])
        await asyncio.wait_for(heard.get(), timeout=5)
    finally:
        await listener.close()
        async with pool.acquire() as conn:
            await conn.execute("DELETE FROM outbox")
        await pool.close()


async def test_a_claim_leaves_rows_younger_than_the_notify_delay_to_their_relay(
    settings: Settings,
) -> None:
    # Another process's relay: it hears every NOTIFY and claims a second later.
    other = settings.model_copy(
        update={"outbox_sweep_seconds": 3600, "outbox_notify_delay_seconds": 1.0}
    )
    pool = await create_pool(other)
    relay = OutboxRelay(pool, other)
    try:
        await relay.start()
        await eventually(lambda: _listening(relay), what="relay listening", timeout=10)
        await write(pool, [event(1)])
        await asyncio.sleep(0.6)
        # Stored for a hand-off to a relay that has not got to it yet.
        [young] = await hand_over(pool, [event(2)])

        await eventually(
            lambda: _published(relay, 1), what="the claimed message", timeout=10
        )
        left = await outbox_ids(pool)
        got = await received(settings)
    finally:
        await relay.stop()
        async with pool.acquire() as conn:
            await conn.execute("DELETE FROM outbox")
        await pool.close()

    assert got == [1]
    assert left == [young["id"]]


async def _published(relay: OutboxRelay, count: int) -> bool:
    return relay.published >= count


async def test_a_hand_off_that_fails_to_publish_is_published_by_a_claim(
    settings: Settings,
) -> None:
    quick = settings.model_copy(update={"outbox_sweep_seconds": 3600})
    pool = await create_pool(quick)
    relay = OutboxRelay(pool, quick)
    publish = relay._publish
    failed = 0

    async def broken_once(channel: AbstractChannel, row: asyncpg.Record) -> None:
        nonlocal failed
        if not failed:
            failed += 1
            raise aio_pika.exceptions.AMQPConnectionError("broker went away")
        await publish(channel, row)

    relay._publish = broken_once  # type: ignore[method-assign]
    try:
        await relay.start()
        relay.hand_off(await hand_over(pool, [event(7)]))

        got = await eventually(
            lambda: received(settings), what="the message", timeout=15
        )
        await eventually(lambda: _empty(pool), what="the row deleted", timeout=10)
    finally:
        await relay.stop()
        await pool.close()

    assert failed == 1
    assert got == [7]


def hold_first_batch(relay: OutboxRelay) -> tuple[asyncio.Event, asyncio.Event]:
    """Keep the first batch ``relay`` publishes from going out, and so from being
    confirmed, until the second event returned is set; the first is set once that
    batch is held."""
    publish_all = relay._publish_all
    holding, release = asyncio.Event(), asyncio.Event()
    calls = 0

    async def held(rows: list[asyncpg.Record]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            holding.set()
            await release.wait()
        await publish_all(rows)

    relay._publish_all = held  # type: ignore[method-assign]
    return holding, release


async def test_rows_handed_over_go_out_while_earlier_ones_await_their_confirms(
    settings: Settings,
) -> None:
    slow_sweep = settings.model_copy(update={"outbox_sweep_seconds": 3600})
    pool = await create_pool(slow_sweep)
    relay = OutboxRelay(pool, slow_sweep)
    holding, release = hold_first_batch(relay)
    got: list[int] = []

    async def arrived(count: int) -> bool:
        got.extend(await received(settings))
        return len(got) >= count

    try:
        await relay.start()
        first = await hand_over(pool, [event(1)])
        relay.hand_off(first)
        await asyncio.wait_for(holding.wait(), 10)
        relay.hand_off(await hand_over(pool, [event(2)]))

        await eventually(lambda: arrived(1), what="the second hand-off published")
        unconfirmed = await outbox_ids(pool)

        release.set()
        await eventually(lambda: arrived(2), what="the first hand-off published")
        await eventually(lambda: _empty(pool), what="both rows deleted", timeout=10)
    finally:
        release.set()
        await relay.stop()
        await pool.close()

    assert got == [2, 1]
    # The first row, not yet confirmed, stayed while the second went out.
    assert first[0]["id"] in unconfirmed


async def test_a_failed_hand_off_is_published_again_while_later_ones_went_out(
    settings: Settings,
) -> None:
    slow_sweep = settings.model_copy(update={"outbox_sweep_seconds": 3600})
    pool = await create_pool(slow_sweep)
    relay = OutboxRelay(pool, slow_sweep)
    holding, release = hold_first_batch(relay)
    publish = relay._publish
    failed = 0

    async def broken_once(channel: AbstractChannel, row: asyncpg.Record) -> None:
        nonlocal failed
        if row["message_id"] == first_id and not failed:
            failed += 1
            raise aio_pika.exceptions.AMQPConnectionError("broker went away")
        await publish(channel, row)

    relay._publish = broken_once  # type: ignore[method-assign]
    got: list[int] = []

    async def arrived(count: int) -> bool:
        got.extend(await received(settings))
        return len(got) >= count

    try:
        await relay.start()
        first = await hand_over(pool, [event(1)])
        first_id = first[0]["message_id"]
        relay.hand_off(first)
        await asyncio.wait_for(holding.wait(), 10)
        relay.hand_off(await hand_over(pool, [event(2)]))
        await eventually(lambda: arrived(1), what="the second hand-off published")

        release.set()
        await eventually(lambda: arrived(2), what="the first one, again", timeout=15)
        await eventually(lambda: _empty(pool), what="both rows deleted", timeout=10)
    finally:
        release.set()
        await relay.stop()
        await pool.close()

    assert failed == 1
    assert got == [2, 1]


async def test_rows_handed_over_beyond_what_a_relay_holds_are_swept_later(
    settings: Settings,
) -> None:
    # Batches of two: the relay holds at most twenty handed-over rows.
    quick = settings.model_copy(update={"outbox_sweep_seconds": 0.5})
    pool = await create_pool(quick)
    relay = OutboxRelay(pool, quick, batch_size=2)
    got: list[int] = []

    async def all_thirty() -> bool:
        got.extend(await received(settings))
        return len(got) >= 30

    try:
        await relay.start()
        relay.hand_off(await hand_over(pool, [event(n) for n in range(30)]))
        held = len(relay._handed)

        await eventually(all_thirty, what="thirty messages", timeout=15)
        await eventually(lambda: _empty(pool), what="the rows deleted", timeout=10)
        await asyncio.sleep(1.2)
        got.extend(await received(settings))
    finally:
        await relay.stop()
        await pool.close()

    assert held == 20
    assert sorted(got) == list(range(30)), "each published once"


# Counts the statements that delete from the outbox, whoever runs them.
COUNT_DELETES = """
CREATE TABLE outbox_deletes (n int NOT NULL);
INSERT INTO outbox_deletes VALUES (0);
CREATE FUNCTION count_outbox_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE outbox_deletes SET n = n + 1;
    RETURN NULL;
END;
$$;
CREATE TRIGGER count_outbox_delete AFTER DELETE ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION count_outbox_delete();
"""


async def test_rows_handed_over_one_by_one_are_deleted_together(
    settings: Settings,
) -> None:
    slow_sweep = settings.model_copy(update={"outbox_sweep_seconds": 3600})
    pool = await create_pool(slow_sweep)
    await pool.execute(COUNT_DELETES)
    relay = OutboxRelay(pool, slow_sweep)
    got: list[int] = []

    async def all_five() -> bool:
        got.extend(await received(settings))
        return len(got) >= 5

    try:
        await relay.start()
        for n in range(5):
            relay.hand_off(await hand_over(pool, [event(n)]))
            await asyncio.sleep(0.005)
        await eventually(all_five, what="five messages")
        await eventually(lambda: _empty(pool), what="the rows deleted", timeout=10)
        deletes = await pool.fetchval("SELECT n FROM outbox_deletes")
    finally:
        await relay.stop()
        await pool.close()

    assert sorted(got) == list(range(5))
    assert 1 <= deletes < 5, f"{deletes} deletes for five hand-offs"


async def test_a_stopping_relay_deletes_the_rows_it_has_published(
    settings: Settings,
) -> None:
    slow_sweep = settings.model_copy(update={"outbox_sweep_seconds": 3600})
    pool = await create_pool(slow_sweep)
    relay = OutboxRelay(pool, slow_sweep)
    try:
        await relay.start()
        relay.hand_off(await hand_over(pool, [event(1)]))
        await eventually(lambda: _published(relay, 1), what="the publish")
        await relay.stop()
        left = await outbox_ids(pool)
        got = await received(settings)
    finally:
        await relay.stop()
        await pool.close()

    assert got == [1]
    assert left == []


async def test_a_relay_kept_busy_by_hand_offs_still_sweeps_on_time(
    settings: Settings,
) -> None:
    quick = settings.model_copy(
        update={"outbox_sweep_seconds": 0.5, "outbox_notify_delay_seconds": 0.2}
    )
    pool = await create_pool(quick)
    relay = OutboxRelay(pool, quick)
    got: list[int] = []
    try:
        await relay.start()
        # Stored for a hand-off by a process that died before making it.
        await hand_over(pool, [event(999)])
        # A steady stream of hand-offs, each waking the relay well within a sweep
        # period, for six periods.
        for n in range(30):
            relay.hand_off(await hand_over(pool, [event(n)]))
            await asyncio.sleep(0.1)
            got.extend(await received(settings))
            if 999 in got:
                break
    finally:
        await relay.stop()
        await pool.close()

    assert 999 in got, "the orphaned row waited for the stream of hand-offs to end"


async def test_a_relay_cut_off_from_the_broker_leaves_its_rows_to_the_others(
    settings: Settings,
) -> None:
    broker = urlsplit(settings.amqp_url)
    proxy = Proxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    await proxy.start()
    proxied = settings.model_copy(
        update={
            "amqp_url": broker._replace(
                netloc=f"{broker.username}:{broker.password}@127.0.0.1:{proxy.port}"
            ).geturl(),
            "outbox_sweep_seconds": 0.5,
            "outbox_notify_delay_seconds": 0.0,
        }
    )
    pool = await create_pool(settings)
    cut_off = OutboxRelay(pool, proxied)
    other = OutboxRelay(pool, settings)
    try:
        await cut_off.start()
        await proxy.cut()
        await write(pool, [event(n) for n in range(5)])
        claims = count_claims(cut_off)
        await eventually(lambda: _tried(claims), what="the cut-off relay trying")
        await other.start()

        got = await eventually(
            lambda: received(settings), what="the rows, from the other relay"
        )
        async with pool.acquire() as conn:
            rows, _ = await backlog(conn)
            holding = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND state = 'idle in transaction'"
            )
    finally:
        await other.stop()
        await cut_off.stop()
        await proxy.close()
        await pool.close()

    assert sorted(got) == list(range(5))
    assert rows == 0
    assert holding == 0
    assert cut_off.published == 0


async def _tried(claims: list[float]) -> bool:
    await asyncio.sleep(0.2)  # into the claim, with the old code holding rows
    return len(claims) >= 1


async def test_a_relay_whose_channel_the_broker_closed_publishes_again_on_a_new_one(
    settings: Settings,
) -> None:
    # A publish refused (here: permissions taken away for a moment) makes the
    # broker close the channel; aio-pika tries once to reopen it, while the
    # refusal still holds, and then leaves it closed on a connection that is up.
    vhost = urlsplit(settings.amqp_url).path.lstrip("/")
    pool = await create_pool(settings)
    relay = OutboxRelay(pool, settings, sweep_seconds=0.5)
    try:
        await relay.start()
        _set_write_permission(vhost, "^$")
        try:
            await write(pool, [event(n) for n in range(3)])
            await eventually(
                lambda: _closed(relay), what="the broker closed the relay's channel"
            )
            await asyncio.sleep(1)
        finally:
            _set_write_permission(vhost, ".*")
        got: list[int] = []

        async def all_three() -> bool:
            got.extend(await received(settings))
            return len(got) >= 3

        await eventually(all_three, timeout=20, what="3 messages on the queue")
    finally:
        await relay.stop()
        await pool.close()

    assert sorted(got) == [0, 1, 2]


def _set_write_permission(vhost: str, pattern: str) -> None:
    infra._rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", pattern, ".*")


async def _closed(relay: OutboxRelay) -> bool:
    return relay._channel is not None and relay._channel.is_closed
