"""Poison messages, the dead-letter tools, lost leases and readiness."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit
from uuid import uuid4

import aio_pika
import asyncpg
import httpx
import pytest

from contracts import migrate, topology
from contracts.consumer import DEAD_LETTERED_AT_HEADER
from contracts.settings import Settings, redact_url
from tests.integration import helpers
from tests.integration.conftest import EmailSenderFactory
from tests.support import infra
from tests.support.data import Demo
from tests.support.processes import free_port
from tests.support.smtp import SmtpServer
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

EMAIL_QUEUE = topology.delivery_queue("email")
ADMIN = str(Path(sys.executable).parent / "notiflow-admin")


def admin(
    settings: Settings, *argv: str, stdout: int = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "NOTIFLOW_AMQP_URL": settings.amqp_url,
        "NOTIFLOW_DATABASE_URL": settings.database_url,
    }
    return subprocess.run(
        [ADMIN, *argv],
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=30,
    )


async def _status(db: asyncpg.Connection, note: int, wanted: str) -> dict | None:
    row = await helpers.row(db, note)
    return row if row["status"] == wanted else None


async def test_poison_messages_are_dead_lettered_while_the_rest_is_delivered(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    before = await helpers.email_row(db, demo.bob, "bob@example.com")
    after = await helpers.email_row(db, demo.alice, "alice@example.com")
    valid = json.loads(helpers.delivery(before, demo.bob))
    missing_field = {k: v for k, v in valid.items() if k != "notification_id"}
    future = {**valid, "schema_version": "2.0"}

    async with email_sender():
        await helpers.publish(
            settings.amqp_url,
            [
                helpers.delivery(before, demo.bob),
                b"{not json",
                json.dumps(missing_field).encode(),
                json.dumps(future).encode(),
                helpers.delivery(after, demo.alice),
            ],
        )
        await eventually(lambda: _status(db, after, "sent"), what="later row sent")
        await eventually(lambda: _status(db, before, "sent"), what="first row sent")
        dead = await eventually(
            lambda: _count_dead(settings, 3), what="three dead letters"
        )

    reasons = sorted(helpers.reason(m) for m in dead)
    assert reasons[0].startswith("body is not valid JSON")
    assert reasons[1].startswith("invalid DeliveryRequested: field 'notification_id'")
    assert reasons[2].startswith("unsupported schema_version '2.0'")
    for message in dead:
        assert message.headers[topology.ORIGIN_QUEUE_HEADER] == EMAIL_QUEUE
    assert len(smtp.received) == 2


async def test_bodies_nested_past_the_parser_are_set_aside_and_hold_nothing_up(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    """More such bodies than the prefetch: left unacked, they would stop the queue."""
    deep = b'{"a":' * 2000 + b"1" + b"}" * 2000
    note = await helpers.email_row(db, demo.bob, "bob@example.com")

    async with email_sender(email_prefetch=4, email_batch_size=2):
        await helpers.publish(
            settings.amqp_url, [deep] * 6 + [helpers.delivery(note, demo.bob)]
        )
        await eventually(lambda: _status(db, note, "sent"), what="the row behind sent")
        await eventually(
            lambda: _depth(settings, topology.DEAD_LETTER_QUEUE, 6), what="set aside"
        )
        listed = admin(settings, "dlq", "list")

    assert listed.returncode == 0, listed.stderr
    assert "6 dead letters in" in listed.stdout
    assert listed.stdout.count("body nests arrays or objects too deeply") == 6
    assert len(smtp.received) == 1


async def _count_dead(settings: Settings, count: int) -> list | None:
    found = await helpers.depths(settings.amqp_url, topology.DEAD_LETTER_QUEUE)
    if found[topology.DEAD_LETTER_QUEUE] < count:
        return None
    return await helpers.take_dead_letters(settings.amqp_url)


async def test_a_dead_letter_is_listed_and_replayed_to_its_queue(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    # A delivery that arrives before its row exists is set aside ("not found").
    next_id = await db.fetchval("SELECT coalesce(max(id), 0) + 1000 FROM notifications")
    async with email_sender():
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(topology.DELIVERIES_EXCHANGE)
            await exchange.publish(
                aio_pika.Message(
                    helpers.delivery(next_id, demo.bob),
                    message_id=f"notification-{next_id}",
                    headers={"notification_id": next_id},
                ),
                routing_key="email",
            )
        await eventually(
            lambda: _depth(settings, topology.DEAD_LETTER_QUEUE, 1), what="set aside"
        )

        listed = admin(settings, "dlq", "list")
        assert listed.returncode == 0, listed.stderr
        assert "1 dead letter in" in listed.stdout
        assert f"notification-{next_id}" in listed.stdout
        assert f"queue={EMAIL_QUEUE}" in listed.stdout
        assert f"notification {next_id} not found" in listed.stdout
        assert await _depth(settings, topology.DEAD_LETTER_QUEUE, 1)

        unknown = admin(settings, "dlq", "replay", "notification-0")
        assert unknown.returncode == 1
        assert "not in the dead-letter queue: notification-0" in unknown.stderr

        await db.execute(
            "INSERT INTO events (id, type, payload, occurred_at) "
            "VALUES (gen_random_uuid(), 'test', '{}', now())"
        )
        await db.execute(
            "INSERT INTO notifications (id, event_id, user_id, email, title, message,"
            " type, channel, event_occurred_at) OVERRIDING SYSTEM VALUE "
            "SELECT $1, id, $2, 'bob@example.com', 't', 'm', 'email', 'c', now() "
            "FROM events LIMIT 1",
            next_id,
            demo.bob,
        )
        replayed = admin(settings, "dlq", "replay", f"notification-{next_id}")
        assert replayed.returncode == 0, replayed.stderr
        assert "1 replayed" in replayed.stdout
        row = await eventually(lambda: _status(db, next_id, "sent"), what="sent")

    assert row["attempts"] == 1
    assert await _depth(settings, topology.DEAD_LETTER_QUEUE, 0)
    assert list(smtp.message_ids()) == [f"<notification-{next_id}@notiflow.localhost>"]


async def _depth(settings: Settings, queue: str, wanted: int) -> bool:
    return (await helpers.depths(settings.amqp_url, queue))[queue] == wanted


async def _dead_letter(
    settings: Settings,
    body: bytes,
    headers: dict[str, object],
    message_id: str | None = None,
) -> None:
    """Put a message straight into the dead-letter queue, as a consumer would."""
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare(channel, (1, 2))
        exchange = await channel.get_exchange(topology.DEAD_LETTER_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(
                body,
                headers={
                    topology.REASON_HEADER: "set aside by the test",
                    topology.ORIGIN_QUEUE_HEADER: EMAIL_QUEUE,
                    **headers,
                },
                message_id=message_id,
            ),
            routing_key=EMAIL_QUEUE,
            timeout=10,
        )


async def test_dead_letters_with_headers_the_client_cannot_write_list_and_replay(
    settings: Settings, demo: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    helpers.allow_undecodable(monkeypatch)
    odd = helpers.Undecodable(b"\xff\xfe odd")
    await _dead_letter(
        settings, helpers.delivery(801, demo.bob), {"x-odd": odd}, message_id="odd"
    )
    await _dead_letter(
        settings,
        helpers.delivery(802, demo.bob),
        {topology.ORIGIN_QUEUE_HEADER: "q" * 300},
        message_id="long",
    )

    listed = admin(settings, "dlq", "list")
    replayed = admin(settings, "dlq", "replay", "--all")

    assert listed.returncode == 0, listed.stderr
    assert "2 dead letters in" in listed.stdout
    assert replayed.returncode == 1, replayed.stderr
    assert "Traceback" not in replayed.stderr
    output = replayed.stdout + replayed.stderr
    assert "odd" in output
    assert "the queue it names is 300 bytes long" in output
    assert await _depth(settings, EMAIL_QUEUE, 1)
    assert await _depth(settings, topology.DEAD_LETTER_QUEUE, 1)
    (back,) = await helpers.take(settings.amqp_url, EMAIL_QUEUE)
    assert bytes(back.headers["x-odd"]) == odd


async def test_dlq_list_names_the_notification_from_headers_or_body(
    settings: Settings, demo: Demo
) -> None:
    in_headers = json.loads(helpers.delivery(901, demo.bob))
    del in_headers["notification_id"]
    await _dead_letter(
        settings, json.dumps(in_headers).encode(), {"notification_id": 901}
    )
    in_body = helpers.delivery(902, demo.bob)
    await _dead_letter(settings, in_body, {})
    await _dead_letter(settings, b"{not json", {})

    listed = admin(settings, "dlq", "list")

    assert listed.returncode == 0, listed.stderr
    assert "3 dead letters" in listed.stdout
    named = [line for line in listed.stdout.splitlines() if "notification=" in line]
    assert [line.split("notification=")[1] for line in named] == ["901", "902", "-"]
    assert f"event={json.loads(in_body)['event_id']}" in named[1]
    assert "event=-" in named[2]


async def test_dlq_list_shortens_long_ids_and_names_a_future_date(
    settings: Settings,
) -> None:
    ahead = datetime.now(UTC) + timedelta(minutes=30)
    body = json.dumps({"event_id": "7" * 5000, "notification_id": 10**60}).encode()
    await _dead_letter(settings, body, {DEAD_LETTERED_AT_HEADER: ahead.isoformat()})

    listed = admin(settings, "dlq", "list")

    assert listed.returncode == 0, listed.stderr
    entry = next(line for line in listed.stdout.splitlines() if "event=" in line)
    assert "age=30m-ahead" in entry or "age=29m-ahead" in entry
    assert f"event={'7' * 40}…(5000 characters)" in entry
    assert f"notification={str(10**60)[:40]}…(61 characters)" in entry
    assert len(entry) < 300


async def test_dlq_list_shows_escape_sequences_and_line_ends_written_out(
    settings: Settings, demo: Demo
) -> None:
    # A mail server's reply, and a publisher's message id, reach the terminal.
    reply = "SMTP 550: no such user \x1b[31mRED\x1b[0m \x1b]0;PWNED\x07 end"
    await _dead_letter(
        settings,
        helpers.delivery(903, demo.bob),
        {topology.REASON_HEADER: reply},
        message_id="one\nnotification=999 fake line",
    )

    listed = admin(settings, "dlq", "list")
    # Given as it was printed.
    discarded = admin(settings, "dlq", "discard", "one\\nnotification=999 fake line")

    assert listed.returncode == 0, listed.stderr
    for shown in (listed.stdout, discarded.stdout):
        assert "\x1b" not in shown and "\x07" not in shown
    assert "no such user \\x1b[31mRED\\x1b[0m \\x1b]0;PWNED\\x07 end" in (listed.stdout)
    lines = listed.stdout.splitlines()
    assert not any(line.startswith("notification=999") for line in lines)
    assert "one\\nnotification=999 fake line" in listed.stdout
    assert discarded.returncode == 0, discarded.stderr
    assert "discarded one\\nnotification=999 fake line" in discarded.stdout


async def test_dlq_list_into_a_closed_pipe_stops_quietly(settings: Settings) -> None:
    # `notiflow-admin dlq list | head` when head has already gone.
    await _dead_letter(settings, b"{}", {})
    read, write = os.pipe()
    os.close(read)
    try:
        done = admin(settings, "dlq", "list", stdout=write)
    finally:
        os.close(write)

    assert done.returncode == 141  # as a tool killed by SIGPIPE reports it
    assert done.stderr == ""
    assert await _depth(settings, topology.DEAD_LETTER_QUEUE, 1)


async def _dead_lettered_by_rabbitmq(
    settings: Settings, message_id: str, queue: str = topology.DISPATCHER_QUEUE
) -> bytes:
    """Put a CommentCreated event into the dead-letter queue carrying only the
    headers RabbitMQ writes when a quorum queue's delivery limit is reached."""
    body = json.dumps({"event_id": "3f2c8d9e-0000-4000-8000-000000000001"}).encode()
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare(channel, (1, 2))
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                headers={
                    "x-death": [
                        {
                            "count": 1,
                            "reason": "delivery_limit",
                            "queue": queue,
                            "time": datetime.now(UTC).replace(microsecond=0),
                            "exchange": topology.EVENTS_EXCHANGE,
                            "routing-keys": [topology.COMMENT_CREATED],
                        }
                    ],
                    "x-first-death-queue": queue,
                    "x-first-death-reason": "delivery_limit",
                    "x-delivery-count": topology.DELIVERY_LIMIT + 1,
                    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-01",
                },
            ),
            routing_key=topology.DEAD_LETTER_QUEUE,
            timeout=10,
        )
    return body


async def _take(settings: Settings, queue: str) -> aio_pika.abc.AbstractMessage | None:
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return await declared.get(no_ack=True, fail=False, timeout=10)


async def test_a_message_rabbitmq_dead_lettered_is_listed_with_its_queue_and_reason(
    settings: Settings,
) -> None:
    await _dead_lettered_by_rabbitmq(settings, "comment-created-7")

    listed = admin(settings, "dlq", "list")

    assert listed.returncode == 0, listed.stderr
    assert "1 dead letter in" in listed.stdout
    entry = next(
        line for line in listed.stdout.splitlines() if "comment-created-7" in line
    )
    assert f"queue={topology.DISPATCHER_QUEUE}" in entry
    assert "event=3f2c8d9e-0000-4000-8000-000000000001" in entry
    assert "age=-" not in entry  # from the time RabbitMQ wrote into x-death
    assert "RabbitMQ dead-lettered it: delivery_limit" in listed.stdout
    assert await _depth(settings, topology.DEAD_LETTER_QUEUE, 1)


async def test_a_message_rabbitmq_dead_lettered_is_replayed_to_its_queue(
    settings: Settings,
) -> None:
    body = await _dead_lettered_by_rabbitmq(settings, "comment-created-8")

    replayed = admin(settings, "dlq", "replay", "comment-created-8")

    assert replayed.returncode == 0, replayed.stderr
    assert "replayed comment-created-8" in replayed.stdout
    assert await _depth(settings, topology.DEAD_LETTER_QUEUE, 0)
    back = await _take(settings, topology.DISPATCHER_QUEUE)
    assert back is not None
    assert (back.body, back.message_id) == (body, "comment-created-8")
    # It starts afresh: no deaths, no deliveries counted against its limit (the
    # quorum queue itself may add a count of 0 on delivery).
    headers = dict(back.headers or {})
    assert headers.pop("x-delivery-count", 0) == 0
    assert headers == {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-01"}


# What RabbitMQ 4.0 and later give every quorum queue unless told otherwise.
RABBITMQ_4_DELIVERY_LIMIT = 20


def _rabbitmqctl(settings: Settings, *args: str) -> str:
    """``rabbitmqctl`` run on the test's own virtual host."""
    vhost = urlsplit(settings.amqp_url).path.lstrip("/")
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    return subprocess.run(
        [ctl, "-q", *args, "-p", vhost],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


async def _limit_dead_letter_deliveries(settings: Settings, limit: int) -> None:
    """Give the dead-letter queue a delivery limit, as RabbitMQ 4 does by default
    (a 3.x broker sets none), and wait until it applies."""
    pattern = "^" + re.escape(topology.DEAD_LETTER_QUEUE) + "$"
    definition = json.dumps({"delivery-limit": limit})
    _rabbitmqctl(settings, "set_policy", "dlq-limit", pattern, definition)

    async def applied() -> bool:
        listing = _rabbitmqctl(settings, "list_queues", "name", "policy")
        return f"{topology.DEAD_LETTER_QUEUE}\tdlq-limit" in listing

    await eventually(applied, what="the delivery limit applied")


async def test_a_dead_letter_listed_past_the_delivery_limit_stays_listed(
    settings: Settings,
) -> None:
    await _dead_lettered_by_rabbitmq(settings, "comment-created-11")
    await _limit_dead_letter_deliveries(settings, RABBITMQ_4_DELIVERY_LIMIT)

    # Each run of either command leaves the dead letter where it was.
    for _ in range(RABBITMQ_4_DELIVERY_LIMIT // 2 + 3):
        assert admin(settings, "dlq", "list").returncode == 0
        other = admin(settings, "dlq", "replay", "comment-created-0")
        assert "not in the dead-letter queue: comment-created-0" in other.stderr
    listed = admin(settings, "dlq", "list")

    assert "1 dead letter in" in listed.stdout, listed.stdout
    entry = next(
        line for line in listed.stdout.splitlines() if "comment-created-11" in line
    )
    assert f"queue={topology.DISPATCHER_QUEUE}" in entry
    assert "RabbitMQ dead-lettered it: delivery_limit" in listed.stdout


async def test_replay_all_sends_back_what_the_delivery_limit_dead_lettered(
    settings: Settings,
) -> None:
    # A dispatcher that crashes on a message makes RabbitMQ deliver it again, until
    # the quorum queue's delivery limit dead-letters it with only x-death to say why.
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare(channel, (1, 2))
        events = await channel.get_exchange(topology.EVENTS_EXCHANGE)
        await events.publish(
            aio_pika.Message(b'{"event_id": "crash"}', message_id="comment-created-9"),
            routing_key=topology.COMMENT_CREATED,
            timeout=10,
        )
        dispatcher = await channel.get_queue(topology.DISPATCHER_QUEUE)
        for _ in range(topology.DELIVERY_LIMIT + 5):
            message = await dispatcher.get(no_ack=False, fail=False, timeout=10)
            if message is None:
                break
            await message.nack(requeue=True)
    await eventually(
        lambda: _depth(settings, topology.DEAD_LETTER_QUEUE, 1), what="dead-lettered"
    )

    listed = admin(settings, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"queue={topology.DISPATCHER_QUEUE}" in listed.stdout
    assert "RabbitMQ dead-lettered it: delivery_limit" in listed.stdout

    replayed = admin(settings, "dlq", "replay", "--all")

    assert replayed.returncode == 0, replayed.stderr
    assert "1 replayed" in replayed.stdout
    assert await _depth(settings, topology.DEAD_LETTER_QUEUE, 0)
    back = await _take(settings, topology.DISPATCHER_QUEUE)
    assert back is not None and back.message_id == "comment-created-9"
    assert "x-death" not in (back.headers or {})


async def _declare_topology(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        await topology.declare(await connection.channel(), (1, 2))


async def _published_to_the_dead_letter_queue(
    settings: Settings, body: bytes, message_id: str
) -> None:
    """Put a message into the dead-letter queue as one published there by hand:
    nothing in it names the queue it came from."""
    await _declare_topology(settings)
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(body, message_id=message_id),
            routing_key=topology.DEAD_LETTER_QUEUE,
            timeout=10,
        )


NO_ORIGIN = (
    f"neither an x-death entry nor an {topology.ORIGIN_QUEUE_HEADER} header names "
    "the queue it came from"
)


async def test_a_dead_letter_of_unknown_origin_is_listed_as_such(
    settings: Settings,
) -> None:
    await _published_to_the_dead_letter_queue(settings, b"{}", "nowhere-1")

    listed = admin(settings, "dlq", "list")

    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        f"1 dead letter in {topology.DEAD_LETTER_QUEUE}",
        "nowhere-1  age=-  origin unknown  event=-  notification=-",
        "    no reason given",
        f"    cannot be replayed: {NO_ORIGIN}",
    ]
    [kept] = await helpers.take_dead_letters(settings.amqp_url)
    assert (kept.body, kept.message_id) == (b"{}", "nowhere-1")


async def test_replay_all_keeps_a_dead_letter_of_unknown_origin_and_counts_it(
    settings: Settings,
) -> None:
    await _published_to_the_dead_letter_queue(settings, b'{"by": "hand"}', "nowhere-2")
    await _dead_letter(settings, b"{}", {}, message_id="t6")

    replayed = admin(settings, "dlq", "replay", "--all")

    assert replayed.returncode == 1
    assert replayed.stdout.splitlines() == [
        "replayed t6",
        f"1 replayed, 1 left in {topology.DEAD_LETTER_QUEUE} (1 of unknown origin)",
    ]
    assert replayed.stderr.splitlines() == [
        f"not replayed: nowhere-2: origin unknown: {NO_ORIGIN}; "
        f"it stays in {topology.DEAD_LETTER_QUEUE}"
    ]
    sent = await _take(settings, EMAIL_QUEUE)
    assert sent is not None and sent.message_id == "t6"
    [kept] = await helpers.take_dead_letters(settings.amqp_url)
    assert (kept.body, kept.message_id) == (b'{"by": "hand"}', "nowhere-2")
    # Left as a confirmed copy, not handed back: no delivery counted against it.
    assert (kept.headers or {}).get("x-delivery-count", 0) == 0


async def test_replaying_a_dead_letter_of_unknown_origin_by_id_says_why_it_stays(
    settings: Settings,
) -> None:
    await _published_to_the_dead_letter_queue(settings, b"{}", "nowhere-3")

    replayed = admin(settings, "dlq", "replay", "nowhere-3")

    assert replayed.returncode == 1
    assert replayed.stdout.splitlines() == [
        f"0 replayed, 1 left in {topology.DEAD_LETTER_QUEUE} (1 of unknown origin)"
    ]
    assert replayed.stderr.splitlines() == [
        f"not replayed: nowhere-3: origin unknown: {NO_ORIGIN}; "
        f"it stays in {topology.DEAD_LETTER_QUEUE}"
    ]
    [kept] = await helpers.take_dead_letters(settings.amqp_url)
    assert (kept.body, kept.message_id) == (b"{}", "nowhere-3")


async def test_a_dead_letter_no_replay_can_send_back_is_discarded_by_its_id(
    settings: Settings,
) -> None:
    await _published_to_the_dead_letter_queue(settings, b"{}", "nowhere-4")
    await _dead_letter(settings, b"{}", {}, message_id="t7")

    discarded = admin(settings, "dlq", "discard", "nowhere-4", "nowhere-5")

    assert discarded.returncode == 1
    assert discarded.stdout.splitlines() == ["discarded nowhere-4", "1 discarded"]
    assert discarded.stderr.splitlines() == ["not in the dead-letter queue: nowhere-5"]
    # The others stay, and replay --all is clean again.
    replayed = admin(settings, "dlq", "replay", "--all")
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.splitlines() == ["replayed t7", "1 replayed"]
    assert await helpers.take_dead_letters(settings.amqp_url) == []


async def test_a_dead_letter_naming_the_dead_letter_queue_is_not_counted_replayed(
    settings: Settings,
) -> None:
    headers = {topology.ORIGIN_QUEUE_HEADER: topology.DEAD_LETTER_QUEUE}
    await _dead_letter(settings, b"{}", headers, message_id="self-1")

    replayed = admin(settings, "dlq", "replay", "--all")

    assert replayed.returncode == 1
    assert replayed.stdout.splitlines()[-1] == (
        f"0 replayed, 1 left in {topology.DEAD_LETTER_QUEUE}"
    )
    assert replayed.stderr.splitlines() == [
        "not replayed: self-1: it names the dead-letter queue itself as the queue "
        f"it came from; it stays in {topology.DEAD_LETTER_QUEUE}"
    ]
    [kept] = await helpers.take_dead_letters(settings.amqp_url)
    assert (kept.body, kept.message_id) == (b"{}", "self-1")


async def test_a_dead_letter_naming_a_retry_queue_stays_and_says_so(
    settings: Settings,
) -> None:
    retry_queue = topology.retry_levels((1, 2))[0].queue
    headers = {topology.ORIGIN_QUEUE_HEADER: retry_queue}
    await _dead_letter(settings, b"{}", headers, message_id="retry-1")
    why = f"it names {retry_queue}, a retry queue no consumer reads, as the queue "
    why += "it came from"

    listed = admin(settings, "dlq", "list")
    replayed = admin(settings, "dlq", "replay", "retry-1")

    assert listed.stdout.splitlines()[2:] == [
        "    set aside by the test",
        f"    cannot be replayed: {why}",
    ]
    assert replayed.returncode == 1
    assert replayed.stderr.splitlines() == [
        f"not replayed: retry-1: {why}; it stays in {topology.DEAD_LETTER_QUEUE}"
    ]
    [kept] = await helpers.take_dead_letters(settings.amqp_url)
    assert (kept.body, kept.message_id) == (b"{}", "retry-1")


async def test_a_dead_letter_without_a_reason_is_listed_as_giving_none(
    settings: Settings,
) -> None:
    await _dead_letter(settings, b"{}", {topology.REASON_HEADER: ""}, "quiet-1")

    listed = admin(settings, "dlq", "list")

    assert listed.stdout.splitlines()[2:] == ["    no reason given"]


async def test_dlq_list_counts_dead_letters_in_the_singular_only_for_one(
    settings: Settings,
) -> None:
    await _declare_topology(settings)
    counts = []
    for message_id in ("n1", "n2", None):
        listed = admin(settings, "dlq", "list")
        assert listed.returncode == 0, listed.stderr
        counts.append(listed.stdout.splitlines()[0])
        if message_id is not None:
            await _dead_letter(settings, b"{}", {}, message_id=message_id)

    assert counts == [
        f"0 dead letters in {topology.DEAD_LETTER_QUEUE}",
        f"1 dead letter in {topology.DEAD_LETTER_QUEUE}",
        f"2 dead letters in {topology.DEAD_LETTER_QUEUE}",
    ]


RENAMED_QUEUE = "notiflow.queue-that-was-renamed"


async def test_a_dead_letter_whose_queue_is_gone_stays_while_the_others_are_replayed(
    settings: Settings,
) -> None:
    kept_headers = {
        topology.REASON_HEADER: "set aside before an upgrade",
        topology.ORIGIN_QUEUE_HEADER: RENAMED_QUEUE,
        "notification_id": 903,
    }
    await _dead_letter(settings, b'{"kept": true}', kept_headers, message_id="t1")
    await _dead_letter(settings, b'{"sent": true}', {}, message_id="t2")

    replayed = admin(settings, "dlq", "replay", "t1", "t2")

    assert replayed.returncode == 1
    assert "replayed t2" in replayed.stdout
    assert "replayed t1" not in replayed.stdout
    assert "1 replayed, 1 left in notiflow.dead-letters" in replayed.stdout
    assert replayed.stderr.splitlines() == [
        f"not replayed: t1: there is no queue {RENAMED_QUEUE}; "
        f"it stays in {topology.DEAD_LETTER_QUEUE}"
    ]
    sent = await _take(settings, EMAIL_QUEUE)
    assert sent is not None and sent.message_id == "t2"
    [kept] = await helpers.take_dead_letters(settings.amqp_url)
    assert (kept.body, kept.message_id) == (b'{"kept": true}', "t1")
    headers = dict(kept.headers or {})
    headers.pop("x-delivery-count", None)  # the quorum queue counts the return
    assert headers == kept_headers


async def test_replaying_an_id_replays_every_dead_letter_that_carries_it(
    settings: Settings,
) -> None:
    # Two copies of one delivery, set aside once each, and another message.
    await _dead_letter(settings, b'{"copy": 1}', {}, message_id="notification-77")
    await _dead_letter(settings, b'{"copy": 2}', {}, message_id="notification-77")
    await _dead_letter(settings, b'{"other": true}', {}, message_id="notification-78")

    replayed = admin(settings, "dlq", "replay", "notification-77")

    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.splitlines() == [
        "replayed notification-77",
        "replayed notification-77",
        "2 replayed",
    ]
    sent = [await _take(settings, EMAIL_QUEUE) for _ in range(2)]
    assert sorted(m.body for m in sent if m is not None) == [
        b'{"copy": 1}',
        b'{"copy": 2}',
    ]
    [kept] = await helpers.take_dead_letters(settings.amqp_url)
    assert kept.message_id == "notification-78"


def test_replay_help_says_an_id_replays_every_dead_letter_that_carries_it() -> None:
    done = subprocess.run(
        [ADMIN, "dlq", "replay", "--help"], capture_output=True, text=True, timeout=30
    )

    unwrapped = " ".join(done.stdout.split())
    assert done.returncode == 0
    assert "every dead letter with that id is replayed" in unwrapped


def test_replay_help_says_a_permanent_failure_is_sent_again_by_requeue_failed() -> None:
    done = subprocess.run(
        [ADMIN, "dlq", "replay", "--help"], capture_output=True, text=True, timeout=30
    )

    unwrapped = " ".join(done.stdout.split())
    assert done.returncode == 0
    expected = "after a permanent failure, or after its attempts ran out, sends nothing"
    assert expected in unwrapped
    assert "another round with `notiflow-admin requeue-failed`" in unwrapped


async def test_replaying_a_permanent_failure_warns_that_nothing_will_be_sent(
    settings: Settings,
) -> None:
    event_id = "8d7f5b52-3c1e-4a4f-9a35-0c6d2f1b9e10"
    refused = {
        topology.REASON_HEADER: "permanent failure: 550 mailbox unavailable",
        "event_id": event_id,
    }
    await _dead_letter(settings, b"{}", refused, message_id="notification-13")
    await _dead_letter(settings, b"{}", {}, message_id="notification-14")

    replayed = admin(settings, "dlq", "replay", "--all")

    assert replayed.returncode == 0, replayed.stderr
    assert "2 replayed" in replayed.stdout
    assert replayed.stderr.splitlines() == [
        "warning: notification-13 was set aside when its notification failed for "
        "good: replaying it sends nothing while that notification is failed; if it "
        "still is, send it again "
        f"with `notiflow-admin requeue-failed --event {event_id}`"
    ]


async def test_replaying_a_dead_letter_marked_row_failed_warns_whatever_its_reason(
    settings: Settings,
) -> None:
    exhausted = {
        topology.REASON_HEADER: "gave up after 6 attempts: SMTP 451 try later",
        topology.ROW_FAILED_HEADER: True,
    }
    await _dead_letter(settings, b"{}", exhausted, message_id="notification-21")
    retried = {topology.REASON_HEADER: "handler error: RuntimeError('boom')"}
    await _dead_letter(settings, b"{}", retried, message_id="notification-22")

    replayed = admin(settings, "dlq", "replay", "--all")

    assert replayed.returncode == 0, replayed.stderr
    assert "2 replayed" in replayed.stdout
    assert replayed.stderr.splitlines() == [
        "warning: notification-21 was set aside when its notification failed for "
        "good: replaying it sends nothing while that notification is failed; if it "
        "still is, send it again "
        "with `notiflow-admin requeue-failed --event EVENT_ID`"
    ]


async def test_replay_all_keeps_what_rabbitmq_dead_lettered_from_a_queue_now_gone(
    settings: Settings,
) -> None:
    gone = await _dead_lettered_by_rabbitmq(settings, "comment-created-10", "old.q")
    await _dead_lettered_by_rabbitmq(settings, "comment-created-11")
    await _dead_letter(settings, b"{}", {}, message_id="t3")

    replayed = admin(settings, "dlq", "replay", "--all")

    assert replayed.returncode == 1
    assert "2 replayed, 1 left in notiflow.dead-letters" in replayed.stdout
    assert "replayed comment-created-11" in replayed.stdout
    assert "replayed t3" in replayed.stdout
    assert "not replayed: comment-created-10: there is no queue old.q" in (
        replayed.stderr
    )
    assert await _depth(settings, EMAIL_QUEUE, 1)
    assert await _depth(settings, topology.DISPATCHER_QUEUE, 1)
    [kept] = await helpers.take_dead_letters(settings.amqp_url)
    assert (kept.body, kept.message_id) == (gone, "comment-created-10")
    assert (kept.headers or {})["x-death"][0]["queue"] == "old.q"


async def test_a_dead_letter_its_queue_refuses_stays_in_the_dead_letter_queue(
    settings: Settings,
) -> None:
    full = "notiflow.full"
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            full, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
    await _dead_letter(
        settings, b"{}", {topology.ORIGIN_QUEUE_HEADER: full}, message_id="t4"
    )

    replayed = admin(settings, "dlq", "replay", "t4")

    assert replayed.returncode == 1
    assert "0 replayed, 1 left in notiflow.dead-letters" in replayed.stdout
    assert f"not replayed: t4: the queue {full} refused it" in replayed.stderr
    assert await _depth(settings, topology.DEAD_LETTER_QUEUE, 1)


def test_admin_says_which_server_it_cannot_reach(settings: Settings) -> None:
    closed = f"amqp://guest:secret@127.0.0.1:{free_port()}/"

    done = admin(settings.model_copy(update={"amqp_url": closed}), "dlq", "list")

    assert done.returncode == 1
    assert (
        "notiflow-admin: cannot reach the broker at amqp://guest:***@127.0.0.1:"
        in done.stderr
    )
    # Only the server that failed, once: no database, no library's own line.
    assert "postgresql" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "secret" not in done.stderr
    assert "Traceback" not in done.stderr
    # What failed in words, and what to do, as a service says it at start.
    assert "Connect call failed" in done.stderr
    assert "AMQPConnectionError" not in done.stderr
    assert "start it with: rabbitmq-server -detached" in done.stderr


def test_admin_facing_something_other_than_a_broker_says_to_check_the_url(
    settings: Settings,
) -> None:
    # An HTTP server on the port the URL names: it answers, so starting a broker
    # is not the advice to give.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer() -> None:
            peer, _ = server.accept()
            with peer:
                peer.recv(1024)
                peer.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")

        responder = threading.Thread(target=answer, daemon=True)
        responder.start()
        elsewhere = f"amqp://guest:secret@127.0.0.1:{port}/"
        done = admin(settings.model_copy(update={"amqp_url": elsewhere}), "dlq", "list")
        responder.join(timeout=10)

    assert done.returncode == 1
    assert "notiflow-admin: cannot reach the broker at" in done.stderr
    assert "check that NOTIFLOW_AMQP_URL names the server and port" in done.stderr
    assert "rabbitmq-server -detached" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize(
    ("where", "hint"),
    [("wrong-password", "refused the login"), ("no-such-vhost", "virtual host")],
)
def test_admin_says_what_the_broker_refused(
    settings: Settings, where: str, hint: str
) -> None:
    base = settings.amqp_url.rsplit("/", 1)[0]
    if where == "wrong-password":
        url = base.replace("guest:guest@", "guest:notit@") + "/"
    else:
        url = f"{base}/notiflow-no-such-vhost"

    done = admin(settings.model_copy(update={"amqp_url": url}), "dlq", "list")

    assert done.returncode == 1
    assert hint in done.stderr, done.stderr
    assert "NOTIFLOW_AMQP_URL" in done.stderr
    assert "notit" not in done.stderr
    assert "Traceback" not in done.stderr


def test_admin_as_a_database_role_that_does_not_exist_says_to_check_the_url(
    settings: Settings,
) -> None:
    nobody = settings.database_url.replace("postgres@", "notiflow_no_such_role@")

    done = admin(
        settings.model_copy(update={"database_url": nobody}),
        "requeue-failed",
        "--event",
        str(uuid4()),
    )

    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert "refused the login" in line
    assert 'role "notiflow_no_such_role" does not exist' in line
    assert "check the user and the password in NOTIFLOW_DATABASE_URL" in line


def test_admin_as_a_broker_user_without_permissions_says_which_to_give(
    settings: Settings,
) -> None:
    user = infra.create_user("secret-pass")
    try:
        # Into the virtual host, but allowed to declare nothing.
        _rabbitmqctl(settings, "set_permissions", user, "^$", ".*", ".*")
        vhost = urlsplit(settings.amqp_url).path.lstrip("/")
        url = f"amqp://{user}:secret-pass@127.0.0.1:5672/{vhost}"

        done = admin(settings.model_copy(update={"amqp_url": url}), "dlq", "list")
    finally:
        infra.delete_user(user)

    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert "refused access" in line and "ACCESS_REFUSED" in line
    assert f"rabbitmqctl set_permissions -p {vhost} {user} '.*' '.*' '.*'" in line
    assert "secret-pass" not in line


def test_admin_on_a_virtual_host_that_does_not_exist_says_so_in_plain_words(
    settings: Settings,
) -> None:
    base = settings.amqp_url.rsplit("/", 1)[0]
    url = f"{base}/notiflow-no-such-vhost"

    done = admin(settings.model_copy(update={"amqp_url": url}), "dlq", "list")

    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"notiflow-admin: the broker at {redact_url(url)} closed the connection as "
        "it opened the virtual host 'notiflow-no-such-vhost': it does not exist, "
        "or the user in NOTIFLOW_AMQP_URL may not use it"
    ]


@pytest.mark.parametrize("command", [("list",), ("replay", "--all")])
def test_admin_on_a_virtual_host_no_service_has_started_on_says_so(
    settings: Settings, command: tuple[str, ...]
) -> None:
    vhost = settings.amqp_url.rsplit("/", 1)[1]

    done = admin(settings, "dlq", *command)

    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"notiflow-admin: the virtual host {vhost!r} at "
        f"{redact_url(settings.amqp_url)} has no queue {topology.DEAD_LETTER_QUEUE}: "
        "no notiflow service has started there, or the queue was deleted since "
        "(a service declares it again before it sets a message aside), so nothing "
        "is waiting in it; check that NOTIFLOW_AMQP_URL names the virtual host the "
        "services use"
    ]


@pytest.mark.parametrize("command", [("list",), ("replay", "--all")])
async def test_a_dlq_command_while_another_holds_the_dead_letters_says_so(
    settings: Settings, command: tuple[str, ...]
) -> None:
    for index in range(3):
        await _published_to_the_dead_letter_queue(settings, b"{}", f"held-{index}")
    vhost = settings.amqp_url.rsplit("/", 1)[1]
    other = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with other:
        # As a dlq command does, before it takes the dead letters.
        channel = await other.channel()
        await channel.declare_queue(
            "notiflow.admin.dlq-lock", exclusive=True, auto_delete=True
        )

        done = await asyncio.to_thread(admin, settings, "dlq", *command)

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"notiflow-admin: another notiflow-admin dlq command is holding the dead "
        f"letters of the virtual host {vhost!r} at {redact_url(settings.amqp_url)}; "
        "nothing was done: run this one once that one has finished"
    ]
    kept = await helpers.take_dead_letters(settings.amqp_url)
    assert sorted(m.message_id for m in kept) == ["held-0", "held-1", "held-2"]


async def test_dlq_lists_run_together_each_see_every_dead_letter_or_wait_their_turn(
    settings: Settings,
) -> None:
    for index in range(30):
        await _published_to_the_dead_letter_queue(settings, b"{}", f"many-{index}")

    runs = await asyncio.gather(
        *(asyncio.to_thread(admin, settings, "dlq", "list") for _ in range(4))
    )

    for run in runs:
        if run.returncode == 0:
            assert run.stdout.splitlines()[0] == (
                f"30 dead letters in {topology.DEAD_LETTER_QUEUE}"
            )
        else:
            assert run.returncode == 1
            assert "another notiflow-admin dlq command" in run.stderr
    assert any(run.returncode == 0 for run in runs)
    assert len(await helpers.take_dead_letters(settings.amqp_url)) == 30


def test_admin_given_a_malformed_url_exits_2_naming_the_setting(
    settings: Settings,
) -> None:
    malformed = "amqp://guest:secret@127.0.0.1:notaport/"

    done = admin(settings.model_copy(update={"amqp_url": malformed}), "dlq", "list")

    assert done.returncode == 2
    assert "NOTIFLOW_AMQP_URL" in done.stderr
    assert "secret" not in done.stderr
    assert "Traceback" not in done.stderr


async def test_requeue_failed_sends_failed_rows_again(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    smtp.unknown.add("bob@example.com")
    note = await helpers.email_row(db, demo.bob, "bob@example.com")
    event_id = await db.fetchval("SELECT event_id FROM notifications WHERE id=$1", note)

    async with email_sender():
        await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])
        await eventually(lambda: _status(db, note, "failed"), what="failed")

        smtp.unknown.clear()
        done = admin(settings, "requeue-failed", "--event", str(event_id))
        assert done.returncode == 0, done.stderr
        assert "1 failed notification set back to pending" in done.stdout
        row = await eventually(lambda: _status(db, note, "sent"), what="sent again")

    assert row["attempts"] == 1
    assert len(smtp.received) == 1


async def test_requeue_failed_prints_each_row_on_a_line_of_its_own_and_the_count(
    settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    event_id = await db.fetchval(
        "INSERT INTO events (id, type, payload, occurred_at) "
        "VALUES (gen_random_uuid(), 'test', '{}', now()) RETURNING id"
    )
    users = (demo.alice, demo.bob, demo.carol)
    notes = [
        await helpers.email_row(db, user, "x@example.com", event_id=event_id)
        for user in users
    ]
    other = await helpers.email_row(db, demo.dave, "dave@example.com")
    await db.execute(
        "UPDATE notifications SET status = 'failed' WHERE id = ANY($1::bigint[])",
        [*notes, other],
    )

    done = admin(settings, "requeue-failed", "--event", str(event_id))

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        *(f"requeued {note}" for note in sorted(notes)),
        "3 failed notifications set back to pending and enqueued",
    ]
    statuses = await db.fetch(
        "SELECT id, status FROM notifications WHERE id = ANY($1::bigint[])",
        [*notes, other],
    )
    assert {row["id"]: row["status"] for row in statuses} == {
        **dict.fromkeys(notes, "pending"),
        other: "failed",
    }


async def test_a_failed_email_requeued_after_its_address_was_corrected_goes_there(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    # Failed for good on the address the user had when it was dispatched.
    note = await helpers.email_row(db, demo.bob, "bob@exa mple..com")
    event_id = await db.fetchval("SELECT event_id FROM notifications WHERE id=$1", note)
    await db.execute(
        "UPDATE notifications SET status = 'failed', attempts = 1, "
        "last_error = 'invalid recipient address' WHERE id = $1",
        note,
    )
    await db.execute(
        "UPDATE users SET email = 'bob.fixed@example.com' WHERE id = $1", demo.bob
    )

    done = admin(settings, "requeue-failed", "--event", str(event_id))
    async with email_sender():
        await eventually(
            lambda: _status_of(db, note, "sent"), what="the requeued email sent"
        )

    assert done.returncode == 0, done.stderr
    assert [m.rcpt_tos for m in smtp.received] == [("bob.fixed@example.com",)]
    assert (await helpers.row(db, note))["email"] == "bob.fixed@example.com"


async def _status_of(db: asyncpg.Connection, note: int, status: str) -> bool:
    return (await helpers.row(db, note))["status"] == status


async def test_requeue_failed_counts_one_row_in_the_singular(
    settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    note = await helpers.email_row(db, demo.bob, "bob@example.com")
    event_id = await db.fetchval("SELECT event_id FROM notifications WHERE id=$1", note)
    await db.execute("UPDATE notifications SET status = 'failed' WHERE id = $1", note)

    once = admin(settings, "requeue-failed", "--event", str(event_id))
    again = admin(settings, "requeue-failed", "--event", str(event_id))

    assert once.returncode == 0, once.stderr
    assert once.stdout.splitlines() == [
        f"requeued {note}",
        "1 failed notification set back to pending and enqueued",
    ]
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        "0 failed notifications set back to pending and enqueued"
    ]


@pytest.mark.parametrize(
    ("state", "complaint"),
    [
        ("empty", "has no notiflow tables; apply the migrations with `make migrate`"),
        ("older", "lacks migration(s) 0004_inbox_unread_count, "),
        ("absent", "does not exist; create and migrate it with `make migrate`"),
    ],
)
def test_requeue_failed_on_a_database_not_migrated_says_to_migrate(
    settings: Settings, state: str, complaint: str
) -> None:
    name = infra.unique("notiflow_unmigrated")
    url = infra.database_url(name)
    try:
        if state == "empty":
            migrate.ensure_database(url)
        elif state == "older":
            infra.migrate_before(url, "0004")

        done = admin(
            settings.model_copy(update={"database_url": url}),
            "requeue-failed",
            "--since",
            "2024-05-01",
        )
    finally:
        asyncio.run(infra.drop_database(name))

    assert done.returncode == 1, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"notiflow-admin: the database at {url} {complaint}")
    assert line.endswith("(notiflow-migrate)")


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["dlq", "replay"], "name the messages to replay, or pass --all"),
        (["dlq", "replay", "--all", "x"], "either --all or message ids"),
        (["dlq", "list", "x"], "unrecognized arguments: x"),
        (["requeue-failed"], "--event EVENT_ID or --since ISO"),
        (["requeue-failed", "--event", "nope"], "'nope' is not an event id"),
        (["requeue-failed", "--since", "yesterday"], "not an ISO 8601 time"),
        (
            ["requeue-failed", "--since", "9999-12-31T23:59:59-01:00"],
            "is out of range: in UTC it falls outside years 1 to 9999",
        ),
        (
            ["requeue-failed", "--event", str(uuid4()), "--event", str(uuid4())],
            "argument --event: given more than once",
        ),
        (
            ["requeue-failed", "--since", "2024-05-01", "--since=2024-05-02"],
            "argument --since: given more than once",
        ),
        (
            ["requeue-failed", "--until", "2024-05-03", "--until", "2024-05-02"],
            "argument --until: given more than once",
        ),
        (
            ["requeue-failed", "--since", "2024-05-02", "--until", "2024-05-01"],
            "is not before",
        ),
    ],
)
def test_admin_refuses_bad_arguments_with_the_usage_of_the_command_given(
    argv: list[str], complaint: str
) -> None:
    command = " ".join(["notiflow-admin", *argv[: 2 if argv[0] == "dlq" else 1]])

    done = subprocess.run([ADMIN, *argv], capture_output=True, text=True, timeout=30)

    assert done.returncode == 2
    usage, error = done.stderr.splitlines()[0], done.stderr.splitlines()[-1]
    assert usage.startswith(f"usage: {command} "), done.stderr
    assert error.startswith(f"{command}: error: "), done.stderr
    assert complaint in error
    assert done.stdout == ""


async def test_a_row_left_sending_by_a_dead_worker_is_sent_by_the_sweeper(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    note = await helpers.email_row(db, demo.bob, "bob@example.com")
    await db.execute(
        "UPDATE notifications SET status = 'sending', attempts = 1, "
        "lease_expires_at = now() - interval '1 second' WHERE id = $1",
        note,
    )

    async with email_sender():
        row = await eventually(lambda: _status(db, note, "sent"), what="recovered")

    assert row["attempts"] == 2
    assert list(smtp.message_ids().values()) == [1]


async def test_a_redelivered_message_for_a_sent_row_sends_nothing(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    note = await helpers.email_row(db, demo.bob, "bob@example.com")
    async with email_sender():
        await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])
        await eventually(lambda: _status(db, note, "sent"), what="sent")
        # The worker crashed between storing 'sent' and acking: RabbitMQ delivers
        # the same message again.
        await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)] * 2)
        await eventually(lambda: _depth(settings, EMAIL_QUEUE, 0), what="consumed")
        row = await helpers.row(db, note)

    assert row["status"] == "sent" and row["attempts"] == 1
    assert smtp.connections == 1


async def test_readiness_fails_while_a_consumer_is_missing(
    settings: Settings, email_sender: EmailSenderFactory
) -> None:
    async with email_sender() as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/readyz")).status_code == 200

            # Deleting the queue makes the broker cancel the consumer.
            connection = await aio_pika.connect(settings.amqp_url)
            async with connection:
                channel = await connection.channel()
                await channel.queue_delete(EMAIL_QUEUE)

            async def unready() -> httpx.Response | None:
                resp = await c.get("/readyz")
                return resp if resp.status_code == 503 else None

            resp = await eventually(unready, what="not ready")

    assert resp.json()["consumers"] == f"not consuming {EMAIL_QUEUE}"
