"""The email sender handles waiting deliveries in batches, and every delivery of a
batch still ends on its own: sent once, retried, or failed and dead-lettered.

Deliveries are published before the sender starts, so that they are waiting when
it does; a slow DATA keeps the sender's workers busy while the rest gather into
batches. Retry delays are 1 s and 2 s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiosmtpd.smtp import Envelope, Session
from prometheus_client import REGISTRY

from contracts import topology
from contracts.logs import JsonFormatter
from contracts.messages import DeliveryBatch, DeliveryRequested
from contracts.settings import Settings
from tests.integration import helpers
from tests.integration.conftest import EmailSenderFactory
from tests.support.data import Demo
from tests.support.smtp import SmtpServer
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

EMAIL_QUEUE = topology.delivery_queue("email")


def _handled() -> float:
    """Messages taken from the email queue so far, however they ended."""
    return helpers.counted("notiflow_messages_handled", queue=EMAIL_QUEUE)


class BusyMailboxes(SmtpServer):
    """Answers RCPT for the addresses in :attr:`busy` with a 451, once each, and
    takes :attr:`slow_seconds` over the DATA of a message to one in :attr:`slow`."""

    def __init__(self) -> None:
        super().__init__()
        self.busy: set[str] = set()
        self.slow: set[str] = set()
        self.slow_seconds = 0.0

    async def handle_RCPT(
        self,
        server: Any,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address in self.busy:
            self.busy.discard(address)
            return "451 4.2.1 mailbox busy, try again later"
        return await super().handle_RCPT(
            server, session, envelope, address, rcpt_options
        )

    async def handle_DATA(
        self, server: Any, session: Session, envelope: Envelope
    ) -> str:
        if self.slow.intersection(envelope.rcpt_tos):
            await asyncio.sleep(self.slow_seconds)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def smtp() -> Iterator[BusyMailboxes]:
    with BusyMailboxes() as server:
        yield server


def _batches() -> tuple[float, float]:
    """Batches handled so far on the email queue, and the messages in them."""
    labels = {"queue": EMAIL_QUEUE}
    count = REGISTRY.get_sample_value("notiflow_consumer_batch_size_count", labels)
    total = REGISTRY.get_sample_value("notiflow_consumer_batch_size_sum", labels)
    return count or 0.0, total or 0.0


async def _statuses(db: asyncpg.Connection, ids: list[int]) -> dict[int, str]:
    rows = await db.fetch(
        "SELECT id, status FROM notifications WHERE id = ANY($1::bigint[])", ids
    )
    return {row["id"]: row["status"] for row in rows}


async def _all_final(db: asyncpg.Connection, ids: list[int]) -> dict[int, str] | None:
    statuses = await _statuses(db, ids)
    if all(status in ("sent", "failed") for status in statuses.values()):
        return statuses
    return None


async def test_a_batch_sends_each_email_once_and_fails_only_the_bad_address(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: BusyMailboxes,
    email_sender: EmailSenderFactory,
) -> None:
    smtp.data_delay = 0.2
    good = [
        await helpers.email_row(db, demo.bob, f"reader{n}@example.com")
        for n in range(60)
    ]
    bad = await helpers.email_row(db, demo.bob, "not an address")
    notes = [*good[:30], bad, *good[30:]]
    await helpers.publish(
        settings.amqp_url, [helpers.delivery(n, demo.bob) for n in notes]
    )
    batches_before, messages_before = _batches()

    # A timeout would retry an email, which this test is not about: on a slow
    # host the replies get the time they need, and the lease outlives them.
    async with email_sender(smtp_timeout=5, email_lease_seconds=30):
        statuses = await eventually(
            lambda: _all_final(db, notes), timeout=30, what="every row final"
        )
        [dead] = await eventually(
            lambda: helpers.take_dead_letters(settings.amqp_url), what="dead letter"
        )
    batches, messages = _batches()

    assert statuses == {**{n: "sent" for n in good}, bad: "failed"}
    assert sorted(smtp.message_ids().values()) == [1] * len(good)
    assert await _attempts(db, good) == {1}
    assert {r.rcpt_tos for r in smtp.received} == {
        (f"reader{n}@example.com",) for n in range(60)
    }
    row = await helpers.row(db, bad)
    assert row["attempts"] == 1
    assert row["last_error"].startswith("invalid recipient address")
    assert helpers.body(dead)["notification_id"] == bad
    assert helpers.reason(dead).startswith("permanent failure: invalid recipient")
    assert messages - messages_before == len(notes)
    # Fewer calls than messages: some were handled together.
    assert batches - batches_before < len(notes)


async def test_a_redelivered_batch_sends_nothing_twice_and_settles_each_message(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: BusyMailboxes,
    email_sender: EmailSenderFactory,
) -> None:
    sent = [await helpers.email_row(db, demo.bob, "bob@example.com") for _ in range(5)]
    async with email_sender():
        await helpers.publish(
            settings.amqp_url, [helpers.delivery(n, demo.bob) for n in sent]
        )
        await eventually(lambda: _all_final(db, sent), what="first round sent")

    # A row another worker is sending right now, one whose retry is not yet due,
    # one that is gone, and one still to send whose message arrives twice.
    held = await helpers.email_row(db, demo.bob, "bob@example.com")
    await db.execute(
        "UPDATE notifications SET status = 'sending', attempts = 1, "
        "lease_expires_at = now() + interval '1 hour' WHERE id = $1",
        held,
    )
    later = await helpers.email_row(db, demo.bob, "bob@example.com")
    await db.execute(
        "UPDATE notifications SET status = 'retrying', attempts = 1, "
        "next_attempt_at = now() + interval '1 hour' WHERE id = $1",
        later,
    )
    gone = await db.fetchval("SELECT max(id) + 1000 FROM notifications")
    twice = await helpers.email_row(db, demo.bob, "bob@example.com")
    again = [*sent, held, later, gone, twice, twice]
    await helpers.publish(
        settings.amqp_url, [helpers.delivery(n, demo.bob) for n in again]
    )
    handled = _handled()

    async with email_sender():

        async def all_handled() -> bool:
            return _handled() - handled >= len(again)

        await eventually(all_handled, what="every redelivered message handled")
        [dead] = await eventually(
            lambda: helpers.take_dead_letters(settings.amqp_url), what="dead letter"
        )

        async def parked() -> bool:
            queued = await helpers.depths(settings.amqp_url, "notiflow.retry.2s")
            return queued["notiflow.retry.2s"] == 1

        # Not due for an hour: parked in the longest delay queue, to come back.
        await eventually(parked, interval=0.05, what="the early one parked")

    assert sorted(smtp.message_ids().values()) == [1] * (len(sent) + 1)
    assert len(smtp.received) == len(sent) + 1
    assert (await helpers.row(db, twice))["status"] == "sent"
    assert (await helpers.row(db, twice))["attempts"] == 1
    assert await _statuses(db, sent) == {n: "sent" for n in sent}
    still = await helpers.row(db, held)
    assert still["status"] == "sending" and still["attempts"] == 1
    waiting = await helpers.row(db, later)
    assert waiting["status"] == "retrying" and waiting["attempts"] == 1
    assert helpers.body(dead)["notification_id"] == gone
    assert helpers.reason(dead) == f"notification {gone} not found"


async def test_a_transient_failure_in_a_batch_retries_only_that_email(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: BusyMailboxes,
    email_sender: EmailSenderFactory,
) -> None:
    smtp.data_delay = 0.2
    smtp.busy.add("busy@example.com")
    smtp.unknown.add("gone@example.com")
    fine = [
        await helpers.email_row(db, demo.bob, f"reader{n}@example.com")
        for n in range(20)
    ]
    busy = await helpers.email_row(db, demo.bob, "busy@example.com")
    gone = await helpers.email_row(db, demo.bob, "gone@example.com")
    notes = [*fine[:10], busy, gone, *fine[10:]]
    await helpers.publish(
        settings.amqp_url, [helpers.delivery(n, demo.bob) for n in notes]
    )

    async with email_sender():

        async def retrying() -> dict | None:
            row = await helpers.row(db, busy)
            return row if row["attempts"] == 1 and row["status"] == "retrying" else None

        parked = await eventually(retrying, interval=0.05, what="busy one parked")
        statuses = await eventually(
            lambda: _all_final(db, notes), timeout=30, what="every row final"
        )
        [dead] = await eventually(
            lambda: helpers.take_dead_letters(settings.amqp_url), what="dead letter"
        )

    assert statuses == {**{n: "sent" for n in fine}, busy: "sent", gone: "failed"}
    assert parked["last_error"].startswith("SMTP 451")
    assert (await helpers.row(db, busy))["attempts"] == 2
    assert await _attempts(db, fine) == {1}
    assert sorted(smtp.message_ids().values()) == [1] * (len(fine) + 1)
    assert [r.rcpt_tos for r in smtp.to("busy@example.com")] == [("busy@example.com",)]
    assert helpers.body(dead)["notification_id"] == gone
    assert helpers.reason(dead).startswith("permanent failure: SMTP 550")


async def _attempts(db: asyncpg.Connection, ids: list[int]) -> set[int]:
    rows = await db.fetch(
        "SELECT DISTINCT attempts FROM notifications WHERE id = ANY($1::bigint[])", ids
    )
    return {row["attempts"] for row in rows}


async def test_a_delivery_batch_message_sends_its_rows_and_sets_aside_only_the_bad_one(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: BusyMailboxes,
    email_sender: EmailSenderFactory,
) -> None:
    event = uuid.uuid4()
    await db.execute(helpers.INSERT_EVENT, event)
    users = [demo.alice, demo.bob, demo.carol]
    addresses = ["alice@example.com", "not an address", "carol@example.com"]
    notes = [
        await helpers.email_row(db, user, address, event_id=event)
        for user, address in zip(users, addresses, strict=True)
    ]
    await helpers.publish(
        settings.amqp_url, [_envelope(event, list(zip(notes, users, strict=True)))]
    )

    async with email_sender():
        statuses = await eventually(
            lambda: _all_final(db, notes), what="every row final"
        )
        [dead] = await eventually(
            lambda: helpers.take_dead_letters(settings.amqp_url), what="dead letter"
        )

    assert statuses == {notes[0]: "sent", notes[1]: "failed", notes[2]: "sent"}
    assert sorted(r.rcpt_tos for r in smtp.received) == [
        ("alice@example.com",),
        ("carol@example.com",),
    ]
    # The bad row goes on alone, so replaying it repeats nothing else.
    assert helpers.body(dead)["notification_id"] == notes[1]
    assert helpers.reason(dead).startswith("permanent failure: invalid recipient")


async def test_a_row_is_sent_without_waiting_for_the_slowest_email_of_its_batch(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: BusyMailboxes,
    email_sender: EmailSenderFactory,
) -> None:
    # Every row a worker dies holding after the server took its email is sent
    # again: none should wait for its batch's slowest email to be recorded.
    smtp.slow.add("slow@example.com")
    smtp.slow_seconds = 2.0
    notes = await _in_one_message(
        settings,
        db,
        {
            demo.alice: "slow@example.com",
            demo.bob: "b@example.com",
            demo.carol: "c@example.com",
            demo.dave: "d@example.com",
        },
    )
    slow, fast = notes[0], notes[1:]

    async with email_sender(smtp_timeout=5, email_lease_seconds=30):

        async def fast_ones_sent() -> dict[int, str] | None:
            statuses = await _statuses(db, notes)
            if all(statuses[n] == "sent" for n in fast):
                return statuses
            return None

        statuses = await eventually(
            fast_ones_sent, interval=0.05, what="the fast rows sent"
        )
        final = await eventually(lambda: _all_final(db, notes), what="all sent")

    assert statuses[slow] == "sending"
    assert final == {n: "sent" for n in notes}
    assert sorted(smtp.message_ids().values()) == [1] * len(notes)


async def test_a_failed_email_is_retried_without_waiting_for_the_slowest_of_its_batch(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: BusyMailboxes,
    email_sender: EmailSenderFactory,
) -> None:
    smtp.slow.add("slow@example.com")
    smtp.slow_seconds = 6.0
    smtp.busy.add("busy@example.com")
    slow, busy = await _in_one_message(
        settings, db, {demo.alice: "slow@example.com", demo.bob: "busy@example.com"}
    )

    async with email_sender(smtp_timeout=10, email_lease_seconds=60):

        async def busy_one_sent() -> dict[int, str] | None:
            statuses = await _statuses(db, [slow, busy])
            return statuses if statuses[busy] == "sent" else None

        # Refused at once, parked for its 1 s delay, and sent on its second
        # attempt while the slow one's server still reads its content.
        statuses = await eventually(
            busy_one_sent, interval=0.05, timeout=20, what="the busy one sent"
        )
        final = await eventually(lambda: _all_final(db, [slow, busy]), what="all sent")

    assert statuses[slow] == "sending"
    assert (await helpers.row(db, busy))["attempts"] == 2
    assert final == {slow: "sent", busy: "sent"}


async def _in_one_message(
    settings: Settings, db: asyncpg.Connection, addresses: dict[int, str]
) -> list[int]:
    """Email rows of one event to these users' addresses, published in one message,
    so that they are handled as one batch; their ids, in order."""
    event = uuid.uuid4()
    await db.execute(helpers.INSERT_EVENT, event)
    notes = [
        await helpers.email_row(db, user, address, event_id=event)
        for user, address in addresses.items()
    ]
    rows = list(zip(notes, addresses, strict=True))
    await helpers.publish(settings.amqp_url, [_envelope(event, rows)])
    return notes


def _envelope(event: uuid.UUID, rows: list[tuple[int, int]]) -> bytes:
    """A DeliveryBatch message for (notification id, user id) rows of one event."""
    return DeliveryBatch(
        deliveries=[
            DeliveryRequested(
                notification_id=note,
                event_id=event,
                user_id=user,
                type="email",
                channel="comment.reply",
                priority=0,
                event_occurred_at=datetime.now(UTC),
            )
            for note, user in rows
        ]
    ).to_bytes()


async def test_a_delivery_of_a_row_of_another_type_is_dead_lettered_with_why(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: BusyMailboxes,
    email_sender: EmailSenderFactory,
) -> None:
    live = await db.fetchval(
        "UPDATE notifications SET type = 'sse' WHERE id = $1 RETURNING id",
        await helpers.email_row(db, demo.bob, "bob@example.com"),
    )
    await helpers.publish(settings.amqp_url, [helpers.delivery(live, demo.bob)])

    async with email_sender():
        [dead] = await eventually(
            lambda: helpers.take_dead_letters(settings.amqp_url), what="dead letter"
        )

    assert helpers.reason(dead) == f"notification {live} is of type sse, not email"
    assert (await helpers.row(db, live))["status"] == "pending"
    assert smtp.received == []


class _JsonLines(logging.Handler):
    """Keeps every record as the JSON line the service would print, formatted when
    logged, so that it carries the trace of the moment."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[dict[str, Any]] = []
        self._format = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append(json.loads(self._format.format(record)))


async def test_each_delivery_of_a_batch_mixing_events_keeps_its_own_events_trace(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: BusyMailboxes,
    email_sender: EmailSenderFactory,
) -> None:
    notes = [
        await helpers.email_row(db, demo.bob, f"reader{n}@example.com")
        for n in range(3)
    ]
    traces = {note: f"{n + 1:032x}" for n, note in enumerate(notes)}
    batch = DeliveryBatch(
        deliveries=[
            DeliveryRequested(
                notification_id=note,
                event_id=uuid.uuid4(),
                user_id=demo.bob,
                type="email",
                channel="comment.reply",
                priority=0,
                event_occurred_at=datetime.now(UTC),
                trace={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
            )
            for note, trace in traces.items()
        ]
    )
    # As the dispatcher sends a message of several events: no trace in its headers.
    await helpers.publish(settings.amqp_url, [batch.to_bytes()])
    lines = _JsonLines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(lines)
    root.setLevel(logging.INFO)
    try:
        async with email_sender():
            await eventually(
                lambda: _all_final(db, notes), timeout=30, what="every row final"
            )
    finally:
        root.removeHandler(lines)
        root.setLevel(level)

    sent = {
        int(entry["notification_id"]): entry.get("trace_id")
        for entry in lines.entries
        if entry.get("action") == "email.sent"
    }
    assert sent == traces
