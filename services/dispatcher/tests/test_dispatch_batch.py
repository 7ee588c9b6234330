"""Dispatching a batch of events at once, against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from contracts.auth import unsubscribe_url
from contracts.consumer import DeadLetter
from contracts.db import create_pool, transaction
from contracts.mentions import MAX_MENTIONS
from contracts.messages import CommentCreated, DeliveryBatch, DeliveryRequested
from contracts.settings import Settings
from dispatcher import channels, templates
from dispatcher.app import DispatcherSettings
from dispatcher.service import Dispatcher, Outcome
from tests.support import infra
from tests.support.data import Demo, seed_demo
from tests.support.deliveries import deliveries_in

pytestmark = pytest.mark.integration

STARTED = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
SECRET = "dispatch-tests-" + "s" * 32


@pytest.fixture
def dispatcher() -> Dispatcher:
    return Dispatcher(
        channels.ChannelConfigs(channels.DEFAULT_PATH, templates.Renderer().problem),
        templates.Renderer(templates.DEFAULT_DIR),
        "http://127.0.0.1:8081",
        secret_key=SECRET,
    )


@dataclass(frozen=True)
class Database:
    url: str
    pool: asyncpg.Pool


async def _pool(url: str) -> asyncpg.Pool:
    return await create_pool(
        Settings(env="test", database_url=url), min_size=1, max_size=4
    )


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    pool = await _pool(database_url)
    try:
        yield Database(database_url, pool)
    finally:
        await pool.close()


@pytest.fixture
async def other_db(pg_template: str) -> AsyncIterator[Database]:
    """A second database, cloned from the same template as the first."""
    name = await infra.create_database(pg_template)
    pool = await _pool(infra.database_url(name))
    try:
        yield Database(infra.database_url(name), pool)
    finally:
        await pool.close()
        await infra.drop_database(name)


async def _world(db: Database, event_ids: list[uuid.UUID]) -> list[CommentCreated]:
    """Two posts and their comments, the same in every fresh database; one event
    per comment, oldest first."""
    demo = await seed_demo(db.url)
    async with db.pool.acquire() as conn:
        second = await conn.fetchval(
            "INSERT INTO posts (author_id, title, body) "
            "VALUES ($1, 'Second post', 'by bob') RETURNING id",
            demo.bob,
        )
        await conn.execute("UPDATE users SET email = NULL WHERE id = $1", demo.dave)
        await conn.execute(
            "INSERT INTO notification_preferences VALUES ($1, 'email', false)",
            demo.alice,
        )
        comments = [
            (demo.post, demo.dave, "I was here first"),
            (second, demo.alice, "Nice post, bob"),
            (demo.post, demo.carol, "Thoughts, @bob? Also @dave and @nobody"),
            (second, demo.carol, "@alice look at this"),
            (demo.post, demo.bob, "Replying to @carol, and @Alice too"),
            (second, demo.bob, "no mentions here"),
        ]
        events = []
        for number, (post, author, body) in enumerate(comments):
            comment = await conn.fetchval(
                "INSERT INTO comments (post_id, author_id, body) "
                "VALUES ($1, $2, $3) RETURNING id",
                post,
                author,
                body,
            )
            events.append(
                CommentCreated(
                    event_id=event_ids[number],
                    occurred_at=STARTED + timedelta(seconds=number),
                    comment_id=comment,
                    post_id=post,
                    author_id=author,
                    body=body,
                )
            )
    return events


def _users(demo: Demo, *names: str) -> list[int]:
    return sorted(getattr(demo, name) for name in names)


def _event(demo: Demo, comment_id: int, author: int, body: str) -> CommentCreated:
    return CommentCreated(
        event_id=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
        comment_id=comment_id,
        post_id=demo.post,
        author_id=author,
        body=body,
    )


async def _comment(pool: asyncpg.Pool, demo: Demo, author: int, body: str) -> int:
    return await pool.fetchval(
        "INSERT INTO comments (post_id, author_id, body) VALUES ($1, $2, $3) "
        "RETURNING id",
        demo.post,
        author,
        body,
    )


async def _snapshot(pool: asyncpg.Pool) -> dict[str, Any]:
    """What dispatching stored, without the ids that depend on insertion order."""
    async with pool.acquire() as conn:
        events = await conn.fetch(
            "SELECT id, type, payload, occurred_at FROM events ORDER BY id"
        )
        rows = await conn.fetch(
            "SELECT id, event_id, user_id, type, email, title, message, channel, "
            "priority, metadata, status, last_error, event_occurred_at "
            "FROM notifications ORDER BY event_id, user_id, type"
        )
        outbox = await conn.fetch(
            "SELECT exchange, routing_key, message_id, headers, body, priority "
            "FROM outbox"
        )
    keys = {r["id"]: (r["event_id"], r["user_id"], r["type"]) for r in rows}
    deliveries = []
    pairs = [(e, m) for e in outbox for m in deliveries_in(e["body"])]
    for entry, message in pairs:
        # A message of one event names it; in a message of several, each delivery
        # carries its own event's trace context instead.
        if "event_id" in entry["headers"]:
            assert entry["headers"]["event_id"] == str(message.event_id)
            assert message.trace is None
        else:
            assert message.trace is not None
        key = keys[message.notification_id]
        assert key == (message.event_id, message.user_id, message.type)
        deliveries.append(
            (
                key,
                entry["exchange"],
                entry["routing_key"],
                entry["priority"],
                message.channel,
                message.priority,
                message.event_occurred_at,
            )
        )
    return {
        "events": [dict(r) for r in events],
        "rows": [{k: v for k, v in r.items() if k != "id"} for r in rows],
        "deliveries": sorted(deliveries),
    }


async def _count(pool: asyncpg.Pool, table: str) -> int:
    return await pool.fetchval(f"SELECT count(*) FROM {table}")


async def test_a_batch_stores_exactly_what_one_event_at_a_time_stores(
    db: Database, other_db: Database, dispatcher: Dispatcher
) -> None:
    event_ids = [uuid.uuid4() for _ in range(6)]
    events = await _world(db, event_ids)
    assert await _world(other_db, event_ids) == events

    async with transaction(db.pool) as conn:
        together = await dispatcher.handle_many(conn, events)
    alone = []
    for event in events:
        async with transaction(other_db.pool) as conn:
            alone.append(await dispatcher.handle(conn, event))

    assert together == alone
    batched, single = await _snapshot(db.pool), await _snapshot(other_db.pool)
    assert batched == single
    assert len(batched["events"]) == 6

    demo = await seed_demo(db.url)
    told: dict[uuid.UUID, set[int]] = {}
    for row in batched["rows"]:
        told.setdefault(row["event_id"], set()).add(row["user_id"])
    assert [sorted(told[i]) for i in event_ids] == [
        _users(demo, "alice"),
        _users(demo, "bob"),
        _users(demo, "alice", "bob", "dave"),
        _users(demo, "alice", "bob"),
        _users(demo, "alice", "carol", "dave"),
        _users(demo, "alice", "carol"),
    ]
    assert [o.rows for o in together] == [2, 2, 8, 5, 8, 4]
    assert [o.skipped for o in together] == [1, 0, 2, 1, 2, 1]


async def test_participants_are_those_who_commented_before_in_the_same_batch(
    db: Database, dispatcher: Dispatcher
) -> None:
    demo = await seed_demo(db.url)
    pool = db.pool
    first = await _comment(pool, demo, demo.bob, "first")
    second = await _comment(pool, demo, demo.carol, "second")
    third = await _comment(pool, demo, demo.dave, "third")
    events = [
        _event(demo, third, demo.dave, "third"),
        _event(demo, first, demo.bob, "first"),
        _event(demo, second, demo.carol, "second"),
    ]

    async with transaction(pool) as conn:
        await dispatcher.handle_many(conn, events)

    rows = await pool.fetch(
        "SELECT event_id, array_agg(DISTINCT user_id ORDER BY user_id) AS users "
        "FROM notifications GROUP BY event_id"
    )
    told = {r["event_id"]: r["users"] for r in rows}
    assert told[events[1].event_id] == [demo.alice]
    assert told[events[2].event_id] == sorted([demo.alice, demo.bob])
    assert told[events[0].event_id] == sorted([demo.alice, demo.bob, demo.carol])


async def test_an_event_naming_a_missing_comment_is_the_only_one_set_aside(
    db: Database, dispatcher: Dispatcher
) -> None:
    demo = await seed_demo(db.url)
    pool = db.pool
    real = await _comment(pool, demo, demo.bob, "hello @carol")
    other = await _comment(pool, demo, demo.carol, "hello back")
    good = _event(demo, real, demo.bob, "hello @carol")
    ghost = _event(demo, 999_999, demo.carol, "@bob made up")
    forged = _event(demo, real, demo.carol, "@alice not mine")
    later = _event(demo, other, demo.carol, "hello back")

    async with transaction(pool) as conn:
        results = await dispatcher.handle_many(
            conn, [good, ghost, forged, ghost, later]
        )

    assert [type(r) for r in results] == [
        Outcome,
        DeadLetter,
        DeadLetter,
        DeadLetter,
        Outcome,
    ]
    reasons = [r.reason for r in results if isinstance(r, DeadLetter)]
    assert reasons[0] == reasons[2]
    assert f"comment 999999 by user {demo.carol}" in reasons[0]
    assert all("does not exist" in reason for reason in reasons)
    stored = {r["id"] for r in await pool.fetch("SELECT id FROM events")}
    assert stored == {good.event_id, later.event_id}
    told = await pool.fetch("SELECT DISTINCT event_id FROM notifications")
    assert {r["event_id"] for r in told} == stored
    bodies = [
        d
        for (b,) in await pool.fetch("SELECT body FROM outbox")
        for d in deliveries_in(b)
    ]
    assert bodies and {d.event_id for d in bodies} == stored


async def test_a_dead_lettered_event_is_not_stored_when_handled_alone(
    db: Database, dispatcher: Dispatcher
) -> None:
    demo = await seed_demo(db.url)
    pool = db.pool
    ghost = _event(demo, 999_999, demo.carol, "@bob made up")

    with pytest.raises(DeadLetter, match="does not exist"):
        async with transaction(pool) as conn:
            await dispatcher.handle(conn, ghost)

    assert await _count(pool, "events") == 0
    assert await _count(pool, "notifications") == 0


async def test_two_events_about_one_comment_notify_once_in_one_batch_or_at_once(
    db: Database, dispatcher: Dispatcher
) -> None:
    demo = await seed_demo(db.url)
    pool = db.pool
    together = await _comment(pool, demo, demo.carol, "hi @bob")
    first, second = (_event(demo, together, demo.carol, "hi @bob") for _ in "12")
    async with transaction(pool) as conn:
        in_batch = await dispatcher.handle_many(conn, [first, second])

    # Two dispatchers, each looking before the other has stored its event.
    racing = await _comment(pool, demo, demo.carol, "hey @bob")
    one, other, third = (_event(demo, racing, demo.carol, "hey @bob") for _ in "123")
    async with transaction(pool) as conn:
        won = await dispatcher.handle_many(conn, [one])

        async def later() -> list[Outcome | DeadLetter]:
            async with transaction(pool) as conn:
                return await dispatcher.handle_many(conn, [other, third])

        lost = asyncio.create_task(later())
        await asyncio.sleep(0.5)  # its lookup done, its insert waiting on ours
    lost_result = await lost

    assert isinstance(in_batch[0], Outcome) and in_batch[0].rows == 5
    assert isinstance(in_batch[1], DeadLetter)
    assert f"dispatched already, by event {first.event_id}" in in_batch[1].reason
    assert isinstance(won[0], Outcome) and won[0].rows == 5
    # Both name the event that was stored, not the batch's first.
    for lost_outcome in lost_result:
        assert isinstance(lost_outcome, DeadLetter)
        assert f"dispatched already, by event {one.event_id}" in lost_outcome.reason
    assert await _count(pool, "events") == 2
    assert await _count(pool, "notifications") == 10


async def test_an_event_stored_by_an_older_dispatcher_still_marks_its_comment(
    db: Database, dispatcher: Dispatcher
) -> None:
    # A dispatcher of the release before events kept their comment, still running
    # during a rolling upgrade, stores the event as it always did.
    demo = await seed_demo(db.url)
    pool = db.pool
    comment = await _comment(pool, demo, demo.carol, "hi @bob")
    older = _event(demo, comment, demo.carol, "hi @bob")
    await pool.execute(
        "INSERT INTO events (id, type, payload, occurred_at) "
        "VALUES ($1, 'comment.created', $2, $3)",
        older.event_id,
        json.loads(older.model_dump_json()),
        older.occurred_at,
    )

    again = _event(demo, comment, demo.carol, "hi @bob")
    async with transaction(pool) as conn:
        [result] = await dispatcher.handle_many(conn, [again])

    assert isinstance(result, DeadLetter)
    assert f"dispatched already, by event {older.event_id}" in result.reason
    assert await _count(pool, "notifications") == 0


async def test_an_event_mentioning_more_than_allowed_notifies_the_first_only(
    db: Database, dispatcher: Dispatcher
) -> None:
    # The comments service takes no such body; an event may carry one all the same.
    demo = await seed_demo(db.url)
    pool = db.pool
    await pool.execute(
        "INSERT INTO users (username, email, display_name) "
        "SELECT 'm' || n, 'm' || n || '@example.com', 'M' || n "
        "FROM generate_series(1, $1::int) AS n",
        MAX_MENTIONS + 5,
    )
    body = " ".join(f"@m{n}" for n in range(1, MAX_MENTIONS + 6))
    comment = await _comment(pool, demo, demo.carol, body)

    async with transaction(pool) as conn:
        await dispatcher.handle_many(conn, [_event(demo, comment, demo.carol, body)])

    notified = await pool.fetch(
        "SELECT DISTINCT u.username FROM notifications n "
        "JOIN users u ON u.id = n.user_id WHERE u.username LIKE 'm%'"
    )
    assert {r["username"] for r in notified} == {
        f"m{n}" for n in range(1, MAX_MENTIONS + 1)
    }


async def test_copies_of_an_event_in_one_batch_are_stored_once(
    db: Database, dispatcher: Dispatcher
) -> None:
    demo = await seed_demo(db.url)
    pool = db.pool
    comment = await _comment(pool, demo, demo.carol, "hi @bob")
    event = _event(demo, comment, demo.carol, "hi @bob")

    async with transaction(pool) as conn:
        results = await dispatcher.handle_many(conn, [event, event, event])

    first, *copies = results
    assert isinstance(first, Outcome) and not first.duplicate and first.rows == 5
    assert copies == [Outcome(duplicate=True), Outcome(duplicate=True)]
    assert await _count(pool, "events") == 1
    assert await _count(pool, "notifications") == 5
    assert await _count(pool, "outbox") == first.pending


async def test_a_redelivered_batch_stores_nothing_twice(
    db: Database, dispatcher: Dispatcher
) -> None:
    pool = db.pool
    events = await _world(db, [uuid.uuid4() for _ in range(6)])
    async with transaction(pool) as conn:
        await dispatcher.handle_many(conn, events[:4])
    before = await _snapshot(pool)

    async with transaction(pool) as conn:
        again = await dispatcher.handle_many(conn, events[:4])
    assert again == [Outcome(duplicate=True)] * 4
    assert await _snapshot(pool) == before

    # A batch mixing old and new events stores only the new ones.
    async with transaction(pool) as conn:
        mixed = await dispatcher.handle_many(conn, events[2:])
    assert [r.duplicate for r in mixed if isinstance(r, Outcome)] == [
        True,
        True,
        False,
        False,
    ]
    after = await _snapshot(pool)
    assert len(after["events"]) == 6
    assert len(after["rows"]) == len(before["rows"]) + sum(r.rows for r in mixed)


async def test_a_batch_costs_the_same_statements_whatever_its_size(
    db: Database, dispatcher: Dispatcher
) -> None:
    demo = await seed_demo(db.url)
    pool = db.pool
    batches = []
    for size in (1, 3, 30):
        batch = []
        for number in range(size):
            body = f"comment {number} for @bob and @dave"
            comment = await _comment(pool, demo, demo.carol, body)
            batch.append(_event(demo, comment, demo.carol, body))
        batches.append(batch)

    counts = []
    for batch in batches:
        async with pool.acquire() as conn:
            counting = _Counting(conn)
            results = await dispatcher.handle_many(counting, batch)  # type: ignore[arg-type]
            counts.append(len(counting.statements))
        stored = [r.rows for r in results if isinstance(r, Outcome)]
        assert len(stored) == len(batch) and min(stored) > 0, stored

    # one to read what the batch needs, one to store all of it
    assert counts == [2, 2, 2], counts


async def test_an_empty_batch_runs_no_statement(
    db: Database, dispatcher: Dispatcher
) -> None:
    async with transaction(db.pool) as conn:
        counting = _Counting(conn)
        assert await dispatcher.handle_many(counting, []) == []  # type: ignore[arg-type]

    assert counting.statements == []


class _Counting:
    """A connection that notes every statement it is given."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.statements: list[str] = []

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        self.statements.append(query)
        return await self._conn.fetch(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        self.statements.append(query)
        return await self._conn.execute(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        self.statements.append(query)
        return await self._conn.fetchrow(query, *args)


# Makes every event row take a moment to insert, so that two batches inserted at
# once are still inserting when they reach each other's rows.
SLOW_EVENT_INSERTS = """
CREATE FUNCTION slow_event_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(0.02);
    RETURN NEW;
END;
$$;
CREATE TRIGGER slow_event_insert BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION slow_event_insert();
"""


async def test_overlapping_batches_on_two_connections_store_each_event_once(
    db: Database, dispatcher: Dispatcher
) -> None:
    demo = await seed_demo(db.url)
    pool = db.pool
    events = []
    for number in range(20):
        comment = await _comment(pool, demo, demo.bob, f"comment {number}")
        events.append(_event(demo, comment, demo.bob, f"comment {number}"))
    await pool.execute(SLOW_EVENT_INSERTS)

    async def dispatch(batch: list[CommentCreated]) -> list[Outcome | DeadLetter]:
        async with transaction(pool, timeout=10) as conn:
            return await dispatcher.handle_many(conn, batch)

    # Opposite orders: inserted as they come, each batch would take half the rows
    # and then wait for the other's, and PostgreSQL would abort one as a deadlock.
    one, two = await asyncio.wait_for(
        asyncio.gather(dispatch(events), dispatch(events[::-1])), timeout=30
    )

    stored = [r.duplicate for r in [*one, *two] if isinstance(r, Outcome)]
    assert len(stored) == 40 and stored.count(False) == 20
    assert await _count(pool, "events") == 20
    rows = await pool.fetch("SELECT event_id, user_id, type FROM notifications")
    assert len(rows) == 20 * 2  # alice, by email and live, for each event


def test_a_prefetch_smaller_than_a_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="NOTIFLOW_DISPATCHER_PREFETCH"):
        DispatcherSettings(dispatcher_prefetch=10, dispatcher_batch_size=20)


async def _outbox(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT routing_key, message_id, priority, headers, body "
        "FROM outbox ORDER BY id"
    )


@pytest.mark.parametrize(
    ("per_message", "sizes"), [(100, [4]), (3, [3, 1]), (1, [1, 1, 1, 1])]
)
async def test_deliveries_of_one_type_and_priority_share_messages_up_to_the_limit(
    db: Database, per_message: int, sizes: list[int]
) -> None:
    demo = await seed_demo(db.url)
    dispatcher = Dispatcher(
        channels.ChannelConfigs(channels.DEFAULT_PATH, templates.Renderer().problem),
        templates.Renderer(templates.DEFAULT_DIR),
        "http://127.0.0.1:8081",
        secret_key=SECRET,
        per_message=per_message,
    )
    # Four people earlier in the thread; the fifth comment replies to all of them.
    async with db.pool.acquire() as conn:
        extra = [
            await conn.fetchval(
                "INSERT INTO users (username, display_name, email) "
                "VALUES ($1, $1, $2) RETURNING id",
                f"reader{n}",
                f"reader{n}@example.test",
            )
            for n in range(3)
        ]
    for author in extra:
        await _comment(db.pool, demo, author, "me too")
    comment = await _comment(db.pool, demo, demo.carol, "no mentions at all")
    async with transaction(db.pool) as conn:
        await dispatcher.handle(
            conn, _event(demo, comment, demo.carol, "no mentions at all")
        )

    emails = [r for r in await _outbox(db.pool) if r["routing_key"] == "email"]
    assert [len(deliveries_in(r["body"])) for r in emails] == sizes
    rows = await db.pool.fetch(
        "SELECT id, user_id FROM notifications WHERE type = 'email' ORDER BY id"
    )
    carried = [d for r in emails for d in deliveries_in(r["body"])]
    assert [d.notification_id for d in carried] == [r["id"] for r in rows]
    assert sorted(d.user_id for d in carried) == sorted([demo.alice, *extra])
    for record, size in zip(emails, sizes, strict=True):
        first = deliveries_in(record["body"])[0].notification_id
        if size == 1:
            # A delivery alone is a plain DeliveryRequested, as older senders read.
            assert b'"deliveries"' not in bytes(record["body"])
            assert record["message_id"] == f"notification-{first}"
            assert record["headers"]["notification_id"] == first
        else:
            assert record["message_id"] == f"notifications-{first}+{size}"
            assert "notification_id" not in record["headers"]


def test_deliveries_per_message_must_fit_a_batch() -> None:
    with pytest.raises(ValueError, match="deliveries per message"):
        Dispatcher(
            channels.ChannelConfigs(
                channels.DEFAULT_PATH, templates.Renderer().problem
            ),
            templates.Renderer(templates.DEFAULT_DIR),
            "http://127.0.0.1:8081",
            secret_key=SECRET,
            per_message=0,
        )


async def test_an_event_whose_body_is_not_the_stored_comments_is_set_aside(
    db: Database, dispatcher: Dispatcher
) -> None:
    demo = await seed_demo(db.url)
    comment = await _comment(db.pool, demo, demo.bob, "plain words")
    tampered = _event(demo, comment, demo.bob, "plain words @dave")

    async with transaction(db.pool) as conn:
        [result] = await dispatcher.handle_many(conn, [tampered])

    assert isinstance(result, DeadLetter)
    assert "body differs from the stored comment" in result.reason
    assert await db.pool.fetchval("SELECT count(*) FROM notifications") == 0
    assert await db.pool.fetchval("SELECT count(*) FROM events") == 0


async def test_only_the_email_row_carries_the_recipients_unsubscribe_link(
    db: Database, dispatcher: Dispatcher
) -> None:
    demo = await seed_demo(db.url)
    comment = await _comment(db.pool, demo, demo.carol, "Have a look, @bob")

    async with transaction(db.pool) as conn:
        await dispatcher.handle_many(
            conn, [_event(demo, comment, demo.carol, "Have a look, @bob")]
        )

    rows = await db.pool.fetch(
        "SELECT type, message, metadata FROM notifications WHERE user_id = $1",
        demo.bob,
    )
    by_type = {row["type"]: row for row in rows}
    link = unsubscribe_url("http://127.0.0.1:8081", demo.bob, SECRET)
    email = by_type["email"]
    assert email["message"].endswith(f"Turn off these emails: {link}")
    assert f'href="{link}"' in email["metadata"]["html"]
    for other in ("sse", "push"):
        assert "unsubscribe" not in by_type[other]["message"], other
        assert "unsubscribe" not in json.dumps(by_type[other]["metadata"]), other


@pytest.mark.parametrize(
    ("events", "per_message"), [(1, 100), (1, 2), (3, 100), (3, 4)]
)
async def test_delivery_messages_written_by_postgres_equal_the_models_serialised(
    db: Database, events: int, per_message: int
) -> None:
    demo = await seed_demo(db.url)
    dispatcher = Dispatcher(
        channels.ChannelConfigs(channels.DEFAULT_PATH, templates.Renderer().problem),
        templates.Renderer(templates.DEFAULT_DIR),
        "http://127.0.0.1:8081",
        secret_key=SECRET,
        per_message=per_message,
    )
    body = "for @bob, @dave and @alice"
    batch = []
    traces = []
    for number in range(events):
        comment = await _comment(db.pool, demo, demo.carol, body)
        # Microseconds and an offset other than UTC: the text must survive as
        # written.
        offset = timezone(timedelta(hours=5, minutes=30))
        batch.append(
            CommentCreated(
                event_id=uuid.uuid4(),
                occurred_at=datetime(2026, 3, 1, 23, 59, 58, 120034 + number, offset),
                comment_id=comment,
                post_id=demo.post,
                author_id=demo.carol,
                body=body,
            )
        )
        traces.append({"traceparent": f"00-{number + 1:032x}-b7ad6b7169203331-01"})
    handed: list[Mapping[str, Any]] = []
    async with db.pool.acquire() as conn:
        outcomes = await dispatcher.handle_many(
            conn, batch, traces=traces, outbox=handed
        )

    assert all(isinstance(o, Outcome) and o.pending >= 4 for o in outcomes)
    rows = await db.pool.fetch(
        "SELECT id, event_id, user_id, type, channel, priority FROM notifications "
        "WHERE status = 'pending' ORDER BY id"
    )
    stored = await db.pool.fetch(
        "SELECT id, exchange, routing_key, message_id, headers, body, priority, "
        "created_at FROM outbox ORDER BY id"
    )
    by_id = {
        event.event_id: (event, trace)
        for event, trace in zip(batch, traces, strict=True)
    }
    expected: list[dict[str, Any]] = []
    # One message per type and priority, the events mixed, up to per_message.
    for type_ in sorted({row["type"] for row in rows}):
        mine = [row for row in rows if row["type"] == type_]
        for start in range(0, len(mine), per_message):
            chunk = mine[start : start + per_message]
            mixed = len({row["event_id"] for row in chunk}) > 1
            deliveries = [
                DeliveryRequested(
                    notification_id=row["id"],
                    event_id=row["event_id"],
                    user_id=row["user_id"],
                    type=row["type"],
                    channel=row["channel"],
                    priority=row["priority"],
                    event_occurred_at=by_id[row["event_id"]][0].occurred_at,
                    trace=by_id[row["event_id"]][1] if mixed else None,
                )
                for row in chunk
            ]
            event, trace = by_id[chunk[0]["event_id"]]
            headers: dict[str, Any] = (
                {} if mixed else {**trace, "event_id": str(event.event_id)}
            )
            first = deliveries[0].notification_id
            if len(deliveries) == 1:
                headers["notification_id"] = first
                message: Any = deliveries[0]
                message_id = f"notification-{first}"
            else:
                message = DeliveryBatch(deliveries=deliveries)
                message_id = f"notifications-{first}+{len(deliveries)}"
            expected.append(
                {
                    "routing_key": type_,
                    "message_id": message_id,
                    "headers": headers,
                    "body": json.loads(message.to_bytes()),
                }
            )

    written = [
        {
            "routing_key": r["routing_key"],
            "message_id": r["message_id"],
            "headers": r["headers"],
            "body": json.loads(bytes(r["body"])),
        }
        for r in stored
    ]
    key = lambda m: m["message_id"]  # noqa: E731
    assert sorted(written, key=key) == sorted(expected, key=key)
    assert len(written) == sum(
        -(-len([r for r in rows if r["type"] == t]) // per_message)
        for t in {r["type"] for r in rows}
    )
    # What the relay was handed is what the table holds, row for row.
    assert [dict(r) for r in stored] == [
        {**row, "body": bytes(row["body"])} for row in handed
    ]
