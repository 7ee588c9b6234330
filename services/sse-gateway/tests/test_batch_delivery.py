"""Delivering many notifications in one transaction, on the real PostgreSQL and
RabbitMQ: the numbers and unread counts each event carries, rows that are not
there to deliver, and two gateways racing for the same users."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest

from contracts.logs import JsonFormatter
from contracts.messages import DeliveryRequested
from contracts.settings import Settings
from sse_gateway import inbox
from sse_gateway.app import GatewaySettings, create_app
from tests.integration.helpers import body, publish, reason, take_dead_letters
from tests.sse import helpers
from tests.support.data import Demo, seed_demo
from tests.support.processes import Service
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

SENTINEL = {"kind": "test.sentinel", "u": 0}


@pytest.fixture
async def demo(settings: Settings) -> Demo:
    return await seed_demo(settings.database_url)


class Heard:
    """Every message PostgreSQL delivered on the inbox channel, in its order."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.messages: list[dict[str, Any]] = []

    def on_notify(self, _c: object, _pid: int, _channel: str, payload: str) -> None:
        self.messages.append(json.loads(payload))

    def notifications(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("kind") == "notification"]

    def events(self) -> list[tuple[int, dict[str, Any]]]:
        """(user, event) of each inline notification, in the order heard."""
        return [(m["u"], m["event"]) for m in self.notifications() if "event" in m]

    async def settle(self) -> None:
        """Return once everything committed before this call has been heard.

        PostgreSQL delivers notifications in commit order, so a sentinel sent now
        arrives after all of them.
        """
        await self._conn.execute(
            "SELECT pg_notify($1, $2)", inbox.NOTIFY_CHANNEL, json.dumps(SENTINEL)
        )

        async def arrived() -> bool:
            return SENTINEL in self.messages

        await eventually(arrived, what="the sentinel notification")
        self.messages.remove(SENTINEL)


@asynccontextmanager
async def listening(url: str) -> AsyncIterator[Heard]:
    conn = await asyncpg.connect(url, timeout=10)
    heard = Heard(conn)
    await conn.add_listener(inbox.NOTIFY_CHANNEL, heard.on_notify)
    try:
        yield heard
    finally:
        await conn.close()


def sse_delivery(notification_id: int, user_id: int) -> bytes:
    return DeliveryRequested(
        notification_id=notification_id,
        event_id=uuid.uuid4(),
        user_id=user_id,
        type="sse",
        channel="comment.mention",
        priority=0,
        event_occurred_at=datetime.now(UTC),
    ).to_bytes()


async def test_a_batch_numbers_each_users_rows_in_id_order_after_what_they_had(
    settings: Settings, demo: Demo
) -> None:
    async with helpers.database(settings.database_url) as pg:
        # Bob already has two in his inbox, one of them read.
        old = [await helpers.add_and_deliver(pg, demo.bob, f"old {i}") for i in (1, 2)]
        await pg.execute(
            "UPDATE notifications SET read_at = now() WHERE id = $1", old[0]
        )
        b1 = await helpers.add(pg, demo.bob, "b1")
        a1 = await helpers.add(pg, demo.alice, "a1")
        b2 = await helpers.add(pg, demo.bob, "b2")
        c1 = await helpers.add(pg, demo.carol, "c1")
        b3 = await helpers.add(pg, demo.bob, "b3")

        async with listening(settings.database_url) as heard:
            async with pg.transaction():
                answers = await inbox.deliver_many(pg, [b3, a1, b1, c1, b2])
            await heard.settle()
        stored = dict(
            await pg.fetch(
                "SELECT id, inbox_seq FROM notifications WHERE status = 'sent'"
            )
        )
        last = dict(await pg.fetch("SELECT user_id, last_seq FROM inbox_sequences"))

    assert answers == [None] * 5
    events = heard.events()
    assert [event["id"] for _, event in events] == [b1, a1, b2, c1, b3]

    def shown(user: int) -> list[tuple[int, int]]:
        return [(e["seq"], e["unread"]) for u, e in events if u == user]

    # The unread count after each row, as delivering them one by one would show it.
    assert shown(demo.bob) == [(3, 2), (4, 3), (5, 4)]
    assert shown(demo.alice) == [(1, 1)]
    assert shown(demo.carol) == [(1, 1)]
    assert [stored[n] for n in (b1, b2, b3, a1, c1)] == [3, 4, 5, 1, 1]
    assert last == {demo.bob: 5, demo.alice: 1, demo.carol: 1}


async def test_an_event_too_big_to_notify_inline_is_sent_as_a_reference(
    settings: Settings, demo: Demo
) -> None:
    async with helpers.database(settings.database_url) as pg:
        small = await helpers.add(pg, demo.bob, "small")
        big = await helpers.add(pg, demo.bob, "big")
        await pg.execute(
            "UPDATE notifications SET message = repeat('x', 8000) WHERE id = $1", big
        )
        async with listening(settings.database_url) as heard:
            async with pg.transaction():
                await inbox.deliver_many(pg, [small, big])
            await heard.settle()

    inline, reference = heard.notifications()
    assert inline["event"]["id"] == small and inline["event"]["unread"] == 1
    assert reference == {"kind": "notification", "u": demo.bob, "ref": big, "unread": 2}


async def test_rows_not_waiting_are_answered_as_they_are_and_never_announced(
    settings: Settings, demo: Demo
) -> None:
    async with helpers.database(settings.database_url) as pg:
        sent = await helpers.add_and_deliver(pg, demo.bob, "already sent")
        skipped = await helpers.add(pg, demo.bob, "preference off")
        await pg.execute(
            "UPDATE notifications SET status = 'skipped' WHERE id = $1", skipped
        )
        fresh = await helpers.add(pg, demo.bob, "fresh")
        email = await helpers.add(pg, demo.bob, "an email", type_="email")
        missing = email + 1000
        async with listening(settings.database_url) as heard:
            async with pg.transaction():
                answers = await inbox.deliver_many(
                    pg, [sent, missing, fresh, skipped, fresh, inbox.MAX_ID + 1, email]
                )
            await heard.settle()
        seq_of_sent = await pg.fetchval(
            "SELECT inbox_seq FROM notifications WHERE id = $1", sent
        )

    # A copy of an id later in the same batch answers like a redelivery.
    assert answers == [
        "sent",
        "missing",
        None,
        "skipped",
        "sent",
        "missing",
        "of type email",
    ]
    assert [(e["id"], e["seq"], e["unread"]) for _, e in heard.events()] == [
        (fresh, 2, 2)
    ]
    assert seq_of_sent == 1


@pytest.fixture
def delivered_lines() -> Iterator[list[dict[str, Any]]]:
    """The gateway's delivery log lines, formatted as in production."""
    lines: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(self.format(record)))

    handler = Collect(logging.INFO)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("sse_gateway.app")
    previous_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)


async def test_a_gateway_dead_letters_a_missing_row_and_skips_a_sent_one(
    settings: Settings, demo: Demo, delivered_lines: list[dict[str, Any]]
) -> None:
    async with helpers.database(settings.database_url) as pg:
        sent = await helpers.add_and_deliver(pg, demo.bob, "already sent")
        first = await helpers.add(pg, demo.bob, "first")
        second = await helpers.add(pg, demo.alice, "second")
        email = await helpers.add(pg, demo.alice, "an email", type_="email")
    missing = email + 1000
    # Published before the gateway starts, so that they wait and are taken in
    # batches (how they split is up to the consumer; deliver_many is tested alone
    # above with exactly this mix).
    await publish(
        settings.amqp_url,
        [
            sse_delivery(first, demo.bob),
            sse_delivery(sent, demo.bob),
            sse_delivery(missing, demo.bob),
            sse_delivery(second, demo.alice),
            sse_delivery(email, demo.alice),
        ],
        routing_key="sse",
    )
    app = create_app(GatewaySettings(**settings.model_dump()))

    async with listening(settings.database_url) as heard:
        async with app.router.lifespan_context(app):
            dead: list[aio_pika.abc.AbstractMessage] = []

            async def both_dead() -> bool:
                dead.extend(await take_dead_letters(settings.amqp_url))
                return len(dead) == 2

            await eventually(both_dead, what="two dead letters")

            async def all_answered() -> bool:
                return len(delivered_lines) == 3

            await eventually(all_answered, what="three deliveries logged")
        await heard.settle()

    reasons = {body(m)["notification_id"]: reason(m) for m in dead}
    assert reasons == {
        missing: f"notification {missing} not found",
        email: f"notification {email} is of type email, not sse",
    }
    assert sorted(e["id"] for _, e in heard.events()) == sorted([first, second])
    by_action = {line["notification_id"]: line["action"] for line in delivered_lines}
    assert by_action == {
        str(first): "sse.delivered",
        str(sent): "sse.skipped_duplicate",
        str(second): "sse.delivered",
    }


@pytest.fixture
def two_gateways(settings: Settings, tmp_path: Path) -> Iterator[list[Service]]:
    env = {
        "NOTIFLOW_ENV": "test",
        "NOTIFLOW_DATABASE_URL": settings.database_url,
        "NOTIFLOW_AMQP_URL": settings.amqp_url,
        "NOTIFLOW_RETRY_DELAYS": settings.retry_delays,
        "NOTIFLOW_DRAIN_SECONDS": "3",
        # Small batches, so that many transactions of both gateways interleave.
        "NOTIFLOW_SSE_BATCH_SIZE": "10",
    }
    gateways = [Service("sse-gateway", env, tmp_path).start() for _ in range(2)]
    try:
        for gateway in gateways:
            gateway.wait_ready()
        yield gateways
    finally:
        for gateway in gateways:
            gateway.stop()


def actions(gateway: Service) -> list[str]:
    found = []
    for line in gateway.log_path.read_text().splitlines():
        try:
            action = json.loads(line).get("action")
        except ValueError:
            continue
        if action in ("sse.delivered", "sse.skipped_duplicate"):
            found.append(action)
    return found


async def test_two_gateways_delivering_for_the_same_users_leave_no_gaps_or_repeats(
    settings: Settings, demo: Demo, two_gateways: list[Service]
) -> None:
    users = [demo.alice, demo.bob, demo.carol]
    async with helpers.database(settings.database_url) as pg:
        rows = [
            (await helpers.add(pg, users[i % 3], f"n{i}"), users[i % 3])
            for i in range(240)
        ]
    # Every delivery twice in a row: the broker hands consecutive messages to
    # different consumers, so the gateways also race for the very same rows.
    bodies = [sse_delivery(n, user) for n, user in rows for _ in range(2)]

    async with listening(settings.database_url) as heard:
        await asyncio.gather(
            publish(settings.amqp_url, bodies[::2], routing_key="sse"),
            publish(settings.amqp_url, bodies[1::2], routing_key="sse"),
        )

        async def all_answered() -> bool:
            return sum(len(actions(g)) for g in two_gateways) == len(bodies)

        await eventually(all_answered, timeout=60, what="every delivery answered")
        await heard.settle()
        async with helpers.database(settings.database_url) as pg:
            stored = await pg.fetch(
                "SELECT user_id, inbox_seq FROM notifications WHERE status = 'sent'"
            )

    # Both took deliveries; which one stores a row is a race, and one gateway
    # may win every race when the broker hands it each row's first copy.
    assert all(actions(g) for g in two_gateways)
    assert sum(actions(g).count("sse.delivered") for g in two_gateways) == len(rows)
    assert await take_dead_letters(settings.amqp_url) == []

    events = heard.events()
    assert sorted(e["id"] for _, e in events) == sorted(n for n, _ in rows)
    for user in users:
        count = sum(1 for _, owner in rows if owner == user)
        mine = [e for u, e in events if u == user]
        # Heard in commit order: consecutive numbers, each once, and no reads,
        # so the unread count is the number itself.
        assert [e["seq"] for e in mine] == list(range(1, count + 1))
        assert all(e["unread"] == e["seq"] for e in mine)
        assert sorted(r["inbox_seq"] for r in stored if r["user_id"] == user) == list(
            range(1, count + 1)
        )


async def test_the_announced_event_is_what_a_replay_of_the_row_shows(
    settings: Settings, demo: Demo
) -> None:
    async with helpers.database(settings.database_url) as pg:
        plain = await helpers.add(pg, demo.bob, 'Zoë said „hi“ 👩‍💻 \\ " \n done')
        whole_second = await helpers.add(pg, demo.bob, "on the second")
        await pg.execute(
            "UPDATE notifications SET metadata = $2, created_at = $3 WHERE id = $1",
            whole_second,
            {"post_id": 7, "html": "<p>kept out</p>", "nested": {"a": [1, "ü"]}},
            datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        )
        async with listening(settings.database_url) as heard:
            async with pg.transaction():
                await inbox.deliver_many(pg, [plain, whole_second])
            await heard.settle()
        rows = {n: await pg.fetchrow(inbox.BY_ID, n) for n in (plain, whole_second)}

    announced = dict(heard.events())
    events = [event for _, event in heard.events()]
    assert announced.keys() == {demo.bob}
    assert events == [
        {**inbox.event(rows[plain]), "unread": 1},
        {**inbox.event(rows[whole_second]), "unread": 2},
    ]
    assert events[1]["created_at"] == "2026-01-02T03:04:05+00:00"
    assert "html" not in events[1]["metadata"]


COUNTED = """
SELECT user_id, count(*) FROM notifications
WHERE inbox_seq IS NOT NULL AND read_at IS NULL AND archived_at IS NULL
GROUP BY user_id
"""


async def test_the_unread_count_kept_beside_the_sequence_matches_the_rows(
    settings: Settings, demo: Demo
) -> None:
    async def both(pg: asyncpg.Connection) -> tuple[dict[int, int], dict[int, int]]:
        kept = dict(await pg.fetch("SELECT user_id, unread FROM inbox_sequences"))
        counted = dict(await pg.fetch(COUNTED))
        return {u: n for u, n in kept.items() if n}, counted

    async with helpers.database(settings.database_url) as pg:
        bobs = [await helpers.add(pg, demo.bob, f"b{n}") for n in range(4)]
        alices = [await helpers.add(pg, demo.alice, f"a{n}") for n in range(2)]
        await inbox.deliver_many(pg, [*bobs, *alices])
        steps = [await both(pg)]

        await pg.execute(inbox.MARK_READ, demo.bob, [bobs[0], bobs[1]])
        steps.append(await both(pg))
        await pg.execute(inbox.ARCHIVE, demo.bob, bobs[2])
        steps.append(await both(pg))
        await pg.execute(inbox.MARK_ALL_READ, demo.alice)
        steps.append(await both(pg))
        await pg.execute("DELETE FROM notifications WHERE id = $1", bobs[3])
        steps.append(await both(pg))
        unread = await pg.fetchval(inbox.UNREAD, demo.bob)

    assert steps[0] == ({demo.bob: 4, demo.alice: 2},) * 2
    for kept, counted in steps:
        assert kept == counted
    assert steps[-1] == ({}, {})
    assert unread == 0
