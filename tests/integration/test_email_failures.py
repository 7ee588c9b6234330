"""How the email sender treats each kind of SMTP failure.

Retry delays are 1 s and 2 s, so a delivery gets three attempts; the SMTP timeout
is half a second.
"""

from __future__ import annotations

import logging
import time

import asyncpg
import pytest

from contracts import topology
from contracts.settings import Settings
from email_sender import worker
from tests.integration import helpers
from tests.integration.conftest import EmailSenderFactory
from tests.support.data import Demo
from tests.support.smtp import SlowServer, SmtpServer
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

EMAIL_QUEUE = topology.delivery_queue("email")
BOB = "bob@example.com"


async def _final(db: asyncpg.Connection, notification_id: int) -> dict:
    async def done() -> dict | None:
        row = await helpers.row(db, notification_id)
        return row if row["status"] in ("sent", "failed") else None

    return await eventually(done, timeout=15, what=f"row {notification_id} final")


async def test_a_4xx_reply_is_retried_through_the_delay_queues_until_it_is_sent(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    smtp.then("tempfail", "tempfail")
    note = await helpers.email_row(db, demo.bob, BOB)

    async with email_sender():
        await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])

        async def parked() -> dict | None:
            row = await helpers.row(db, note)
            queued = await helpers.depths(settings.amqp_url, "notiflow.retry.1s")
            if row["status"] == "retrying" and queued["notiflow.retry.1s"] == 1:
                return row
            return None

        retrying = await eventually(parked, interval=0.05, what="first retry parked")
        row = await _final(db, note)

    assert retrying["next_attempt_at"] is not None
    assert retrying["last_error"].startswith("SMTP 451")
    assert retrying["next_attempt_at"] > retrying["updated_at"]
    assert row["status"] == "sent" and row["attempts"] == 3
    assert row["last_error"] is None and row["next_attempt_at"] is None
    assert smtp.connections == 3
    assert list(smtp.message_ids().values()) == [1]
    assert await helpers.take_dead_letters(settings.amqp_url) == []


async def test_exhausted_attempts_end_failed_and_in_the_dead_letter_queue(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    smtp.default = "tempfail"
    note = await helpers.email_row(db, demo.bob, BOB)

    async with email_sender():
        await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])
        row = await _final(db, note)
        [dead] = await eventually(
            lambda: helpers.take_dead_letters(settings.amqp_url), what="dead letter"
        )

    assert row["status"] == "failed" and row["attempts"] == 3
    assert row["last_error"].startswith("gave up after 3 attempts: SMTP 451")
    assert smtp.connections == 3 and smtp.received == []
    assert helpers.reason(dead).startswith("gave up after 3 attempts")
    assert dead.headers[topology.ROW_FAILED_HEADER] is True
    assert dead.headers[topology.ORIGIN_QUEUE_HEADER] == EMAIL_QUEUE
    assert dead.headers[topology.ATTEMPT_HEADER] == 2
    # It went round both delay queues before giving up.
    assert {d["queue"] for d in dead.headers["x-death"]} == {
        "notiflow.retry.1s",
        "notiflow.retry.2s",
    }
    assert helpers.body(dead)["notification_id"] == note


async def test_a_refused_mailbox_fails_at_once(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    smtp.unknown.add(BOB)
    note = await helpers.email_row(db, demo.bob, BOB)

    async with email_sender():
        await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])
        row = await _final(db, note)
        [dead] = await eventually(
            lambda: helpers.take_dead_letters(settings.amqp_url), what="dead letter"
        )

    assert row["status"] == "failed" and row["attempts"] == 1
    assert row["last_error"].startswith("SMTP 550")
    assert smtp.connections == 1 and smtp.received == []
    assert helpers.reason(dead).startswith("permanent failure: SMTP 550")
    assert dead.headers[topology.ROW_FAILED_HEADER] is True
    assert dead.headers[topology.ORIGIN_QUEUE_HEADER] == EMAIL_QUEUE
    assert "x-death" not in dead.headers


@pytest.mark.parametrize("address", ["not an address", "a@b@c", "zoë@exämple.com"])
async def test_an_invalid_address_fails_at_once_without_a_connection(
    address: str,
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    note = await helpers.email_row(db, demo.bob, address)

    async with email_sender():
        await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])
        row = await _final(db, note)
        [dead] = await eventually(
            lambda: helpers.take_dead_letters(settings.amqp_url), what="dead letter"
        )

    assert row["status"] == "failed" and row["attempts"] == 1
    assert row["last_error"].startswith("invalid recipient address")
    assert address in row["last_error"]
    assert smtp.connections == 0
    assert helpers.reason(dead).startswith("permanent failure: invalid recipient")


async def test_a_server_that_never_greets_times_out_and_is_retried(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    smtp.then("hang")
    note = await helpers.email_row(db, demo.bob, BOB)

    async with email_sender():
        await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])
        row = await _final(db, note)

    assert row["status"] == "sent" and row["attempts"] == 2
    assert smtp.connections == 2
    assert list(smtp.message_ids().values()) == [1]


async def test_a_connection_dropped_after_data_is_sent_again_with_the_same_id(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    smtp.then("drop")
    note = await helpers.email_row(db, demo.bob, BOB)

    async with email_sender():
        await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])
        row = await _final(db, note)

    # The server may have kept the first copy; the client could not know. Both
    # carry the same Message-ID, which lets mail systems fold them together.
    assert row["status"] == "sent" and row["attempts"] == 2
    [dropped] = smtp.dropped
    [received] = smtp.received
    assert dropped.message_id == received.message_id
    assert received.message_id == f"<notification-{note}@notiflow.localhost>"


async def test_an_email_whose_lease_would_run_out_mid_conversation_is_left_to_it(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A lease of 3 s, and a whole conversation of at most 2.5 s (four 0.5 s
    # replies and the content's): a sender held up for a second after its claim,
    # as a paused or starved process is, may not start one. Past its lease the
    # row may be another sender's, which sends it too.
    real_build = worker.mime.build
    held = []

    def held_up_once(**kwargs: object) -> object:
        if not held:
            held.append(True)
            time.sleep(1.0)
        return real_build(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(worker.mime, "build", held_up_once)
    note = await helpers.email_row(db, demo.bob, BOB)

    with caplog.at_level(logging.WARNING, logger="email_sender.worker"):
        async with email_sender():
            await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])
            row = await _final(db, note)

    # Not sent on the claim it could not finish in; sent once by the next.
    assert row["status"] == "sent" and row["attempts"] == 2
    assert len(smtp.to(BOB)) == 1
    assert "email.lease_ran_out" in [getattr(r, "action", "") for r in caplog.records]


async def test_emails_waiting_for_a_relay_that_allows_few_connections_all_go_in_turn(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    email_sender: EmailSenderFactory,
) -> None:
    # Two connections at once, half a second an email: more than a lease's worth
    # of emails wait their turn, each tried once, none failed for the wait.
    notes = [await helpers.email_row(db, demo.bob, BOB) for _ in range(40)]
    async with SlowServer(0.05, 0.3, most_connections=2) as relay:
        async with email_sender(smtp_port=relay.port):
            await helpers.publish(
                settings.amqp_url, [helpers.delivery(n, demo.bob) for n in notes]
            )

            async def settled() -> list[dict] | None:
                rows = [await helpers.row(db, n) for n in notes]
                done = all(r["status"] in ("sent", "failed") for r in rows)
                return rows if done else None

            rows = await eventually(settled, timeout=90, what="every email settled")

    assert [r["status"] for r in rows] == ["sent"] * 40
    assert relay.taken == 40
    assert relay.most_open == 2
    assert max(r["attempts"] for r in rows) == 1
