"""``notiflow-admin``: the operator's tools for messages and rows that gave up.

::

    notiflow-admin dlq list
    notiflow-admin dlq replay --all | MESSAGE_ID...
    notiflow-admin dlq discard MESSAGE_ID...
    notiflow-admin requeue-failed --event EVENT_ID | --since ISO [--until ISO]
    notiflow-admin redispatch --since ISO [--until ISO]

A dead letter is named by its AMQP ``message_id``; a message published without one
(a poison message from a foreign producer) is named ``sha256:`` and the first
twelve hex digits of its body's hash. A name picks every dead letter that has it.
The ids notiflow gives (``notification-ID``, an event's id) name a delivery or an
event, not one copy of it: copies of one (published again by a sweep or a requeue
and set aside again, or left twice by a tool killed midway) share the id, and the
consumers, which act once per notification row, take them as one.

Replaying publishes the message to the queue it was taken from, through the default
exchange, waits for RabbitMQ's confirm, and only then removes it from the
dead-letter queue: a crash in between leaves a duplicate, which every consumer
absorbs, never a loss. The copy is published mandatory, because RabbitMQ confirms a
message it could not route as readily as one it queued: when the queue is gone
(removed, or renamed by an upgrade) RabbitMQ returns the copy, and the dead letter
stays where it was, named on standard error with that queue, while the others are
replayed. So does one the queue refuses.

Replaying does not undo a notification's failure. A consumer that gives up on a
notification for good (a permanent refusal, its attempts used up, every device
refusing a push) marks its row ``failed`` and sets its message aside with the header
``topology.ROW_FAILED_HEADER``; dead letters older than that header are known by a
reason starting "permanent failure". Replayed, such a message reaches a consumer
that finds the row failed, sends nothing and acknowledges it, and the dead letter is
gone. ``requeue-failed`` is what gives a failed notification another round; replay
names on standard error each such dead letter it replayed.

Both commands leave a dead letter they do not replay where it was by publishing a
copy of it to the dead-letter queue, waiting for RabbitMQ's confirm, and only then
acknowledging the original. Handing it back unacknowledged (``basic.nack`` with
requeue) would count as a failed delivery, and RabbitMQ 4.0 gives every quorum
queue, this one included, a delivery limit of 20 by default: a dead letter listed
twenty-one times would be dropped, the dead-letter queue having no dead-letter queue
of its own. The copy starts afresh, with the original's headers (``x-death``
included) and properties. A tool killed between the two leaves both, a duplicate;
one killed while it holds dead letters hands them back through RabbitMQ, which
counts that once against the limit.

A consumer that sets a message aside names its queue and the reason in notiflow's
own headers. RabbitMQ dead-letters on its own too (the dispatcher queue's delivery
limit after a consumer crashed over and over, a rejection, an expiry) and then
writes only ``x-death``; its latest entry names the queue and the reason instead.
A dead letter with neither (published to the dead-letter queue by hand, or by
another tool) has no queue to go back to: ``dlq list`` shows its origin as unknown,
and replay, asked for it by id or with ``--all``, leaves it in the dead-letter queue
as it leaves one whose queue is gone, names it on standard error and counts it
among those left. So does it with one whose header names the dead-letter queue
itself or a retry queue, where no consumer would ever read it.

``requeue-failed`` sets ``failed`` rows back to ``pending`` with their attempts
reset (an email row with the user's address as it is now, so that one corrected
since is used), and enqueues a delivery for each through the outbox in the same
transaction;
the next outbox relay to wake up publishes them. Times without a zone are UTC. It
prints ``requeued ID`` for each row, in id order, then how many there were. It first
checks, as the services do at start, that the database exists and has every
migration this release ships, and otherwise says to run ``make migrate``.

``redispatch`` publishes again, through the outbox, the event of each comment
written in the times given that no event was recorded for and none waits in the
outbox for: one lost after the outbox gave it to RabbitMQ, with the dispatcher's
queue deleted by hand while it waited there, say. Comments of the last minute are
left out, their events perhaps on their way; one that arrives after all is set
aside by the dispatcher, which notifies no one twice. It prints ``redispatched
comment ID`` for each, then how many there were.

Exit status: 0 done, 1 a server refused or could not be reached, or the database
is not migrated (or a message to replay was not found, or stayed in the
dead-letter queue), 2 a bad command line,
141 standard output was closed before everything was written
(``notiflow-admin dlq list | head``).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import UUID, uuid4

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelAccessRefused, ChannelLockedResource

from contracts import preflight, topology
from contracts.cli import Once
from contracts.consumer import DEAD_LETTERED_AT_HEADER, sendable_headers
from contracts.messages import CommentCreated
from contracts.outbox import enqueue, outgoing_event
from contracts.recovery import requeue_failed
from contracts.settings import (
    Settings,
    amqp_connection_name,
    load_or_exit,
    redact_url,
)

# Headers a replayed message should not carry back to its consumer. Without
# RabbitMQ's death and delivery counts it starts afresh, as a first publish does: a
# message that reached the delivery limit gets its full allowance again.
_SET_ASIDE_HEADERS = {
    topology.REASON_HEADER,
    topology.ORIGIN_QUEUE_HEADER,
    topology.ORIGIN_EXCHANGE_HEADER,
    topology.ORIGIN_ROUTING_KEY_HEADER,
    topology.ATTEMPT_HEADER,
    DEAD_LETTERED_AT_HEADER,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
}


class UsageError(Exception):
    """The command line asks for something that cannot be done."""


class NotMigrated(Exception):
    """The database does not exist, or lacks a migration this release ships."""


class OutputClosed(Exception):
    """Whoever read standard output stopped reading, as ``head`` does."""


# Failing to reach a server, as the clients raise it. aio-pika wraps socket errors
# in AMQPConnectionError, a ConnectionError; asyncpg lets them through (refused or
# reset, unknown host, timeout) and names a connection lost later by SQLSTATE class
# 08. A BrokenPipeError is a ConnectionError too, but the one from our standard
# output never gets here: _say turns it into OutputClosed.
_UNREACHABLE = (
    ConnectionError,
    TimeoutError,
    socket.gaierror,
    asyncpg.PostgresConnectionError,
)
# Socket errors without a class of their own that still mean "no way there".
_NO_ROUTE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN}

# What a C tool killed by SIGPIPE reports (128 + 13). It is chosen over 0 because
# the work is done by then but its report was not read in full, which a script
# running under `set -o pipefail` should learn, exactly as from `grep ... | head`.
_EXIT_OUTPUT_CLOSED = 141


@dataclass(frozen=True)
class DeadLetter:
    id: str
    reason: str
    queue: str
    event_id: str
    notification_id: str
    age_seconds: float | None


def message_name(message: AbstractIncomingMessage) -> str:
    if message.message_id:
        return message.message_id
    return "sha256:" + hashlib.sha256(message.body).hexdigest()[:12]


@dataclass(frozen=True)
class Origin:
    """Where a dead letter came from and why; empty strings when nobody said."""

    queue: str
    reason: str
    when: datetime | None


def origin(message: AbstractIncomingMessage) -> Origin:
    headers = message.headers or {}
    queue = _text(headers.get(topology.ORIGIN_QUEUE_HEADER))
    if queue:
        return Origin(
            queue=queue,
            reason=_text(headers.get(topology.REASON_HEADER)),
            when=_when(headers.get(DEAD_LETTERED_AT_HEADER)),
        )
    # RabbitMQ lists a message's deaths most recent first, one entry per queue and
    # reason, so the first entry is the queue it has to go back to.
    deaths = headers.get("x-death")
    latest = deaths[0] if isinstance(deaths, list) and deaths else None
    if isinstance(latest, dict) and (queue := _text(latest.get("queue"))):
        return Origin(
            queue=queue,
            reason=_by_rabbitmq(_text(latest.get("reason"))),
            when=_when(latest.get("time")),
        )
    return Origin(
        queue="",
        reason=_text(headers.get(topology.REASON_HEADER)),
        when=_when(headers.get(DEAD_LETTERED_AT_HEADER)),
    )


def _by_rabbitmq(reason: str) -> str:
    if reason:
        return f"RabbitMQ dead-lettered it: {reason}"
    return "RabbitMQ dead-lettered it, recording no reason"


def describe(message: AbstractIncomingMessage, now: datetime) -> DeadLetter:
    headers = message.headers or {}
    came_from = origin(message)
    since = came_from.when or message.timestamp
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    # The outbox puts the ids in headers, but a message from elsewhere may carry
    # them only in its body; a body that does not validate still names them.
    sources = (headers, _json_object(message.body))
    return DeadLetter(
        id=message_name(message),
        reason=came_from.reason,
        queue=came_from.queue,
        event_id=_first_id(sources, "event_id"),
        notification_id=_first_id(sources, "notification_id"),
        age_seconds=(now - since).total_seconds() if since else None,
    )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError included
        return {}
    return value if isinstance(value, dict) else {}


def _first_id(sources: tuple[dict[str, Any], ...], key: str) -> str:
    """The first usable value of ``key``: a string or an integer, not a structure."""
    for source in sources:
        value = source.get(key)
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if isinstance(value, bool) or not isinstance(value, str | int):
            continue
        if text := str(value).strip():
            return text
    return ""


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _when(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


class NoDeadLetterQueue(Exception):
    """The virtual host has no dead-letter queue: no service has started there."""


class DeadLettersBusy(Exception):
    """Another ``dlq`` command is holding the dead letters of the virtual host."""


# A queue only one connection at a time may have: each ``dlq`` command declares it
# before taking the dead letters, and it goes with the command's connection. Two
# commands at once would each see only the dead letters the other is not holding,
# and a replay of them all would leave the rest.
DLQ_LOCK_QUEUE = "notiflow.admin.dlq-lock"


async def _broker(settings: Settings) -> aio_pika.abc.AbstractConnection:
    return await aio_pika.connect(
        settings.amqp_url,
        timeout=10,
        client_properties={
            "connection_name": amqp_connection_name(settings.amqp_url, "admin")
        },
    )


async def _hold_dead_letters(connection: aio_pika.abc.AbstractConnection) -> None:
    channel = await connection.channel()
    try:
        await channel.declare_queue(DLQ_LOCK_QUEUE, exclusive=True, auto_delete=True)
    except ChannelLockedResource:
        raise DeadLettersBusy from None


async def _taken(
    channel: aio_pika.abc.AbstractChannel,
) -> list[AbstractIncomingMessage]:
    """Every message now in the dead-letter queue, held unacked on ``channel``."""
    try:
        queue = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        raise NoDeadLetterQueue from None
    count = queue.declaration_result.message_count or 0
    taken: list[AbstractIncomingMessage] = []
    # Bounded by the count seen at the start: messages dead-lettered meanwhile wait
    # for the next run, and a returned message is never read twice.
    while len(taken) < count:
        message = await queue.get(no_ack=False, fail=False, timeout=10)
        if message is None:
            break
        taken.append(message)
    return taken


async def dlq_list(settings: Settings) -> list[DeadLetter]:
    connection = await _broker(settings)
    async with connection:
        await _hold_dead_letters(connection)
        reading = await connection.channel()
        publishing = await connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        taken = await _taken(reading)
        now = datetime.now(UTC)
        found = [describe(message, now) for message in taken]
        for message in taken:
            await _put_back(publishing, message)
    return found


@dataclass(frozen=True)
class Kept:
    """A dead letter not replayed; it stays in the dead-letter queue."""

    id: str
    why: str
    # The queue it came from; empty when nothing names one.
    queue: str


# Why a dead letter that names no queue it came from stays where it is.
_NO_ORIGIN = (
    f"neither an x-death entry nor an {topology.ORIGIN_QUEUE_HEADER} header names "
    "the queue it came from"
)


# Where the retry queues' names start: queues a message waits in, read by no one.
RETRY_QUEUE_PREFIX = topology.RetryLevel(0).queue.removesuffix("0s")


# AMQP's limit on a queue name, and so on the routing key that finds one.
MAX_QUEUE_NAME_BYTES = 255


def _not_replayable(queue: str) -> str | None:
    """Why a dead letter that names ``queue`` as its origin cannot go back there.

    Only a hand-set header names one of these. Sent to the dead-letter queue itself,
    it would be counted replayed while it stays; sent to a retry queue, which no
    consumer reads, it would expire into an exchange that routes it nowhere, lost.
    """
    if queue == topology.DEAD_LETTER_QUEUE:
        return "it names the dead-letter queue itself as the queue it came from"
    if len(queue.encode()) > MAX_QUEUE_NAME_BYTES:
        return (
            f"the queue it names is {len(queue.encode())} bytes long; no queue "
            f"name is longer than {MAX_QUEUE_NAME_BYTES}"
        )
    if queue.startswith(RETRY_QUEUE_PREFIX):
        return (
            f"it names {queue}, a retry queue no consumer reads, as the queue it "
            "came from"
        )
    return None


# How the reason began on dead letters of notifications that failed for good,
# before consumers marked them with ``topology.ROW_FAILED_HEADER``.
_PERMANENT_FAILURE = "permanent failure"


@dataclass(frozen=True)
class FailedForGood:
    """A replayed dead letter whose notification failed for good."""

    id: str
    event_id: str


@dataclass(frozen=True)
class Replay:
    replayed: list[str]
    kept: list[Kept]
    # Asked for by id but not in the dead-letter queue.
    missing: list[str]
    # Replayed, but their notifications stay failed: nothing will be sent.
    failed_for_good: list[FailedForGood]


@asynccontextmanager
async def _dead_letters(
    settings: Settings,
) -> AsyncIterator[tuple[aio_pika.abc.AbstractChannel, list[AbstractIncomingMessage]]]:
    """Every dead letter, held unacked for this command alone, and a confirming
    channel to publish on; closed, what was not acknowledged goes back."""
    connection = await _broker(settings)
    async with connection:
        await _hold_dead_letters(connection)
        reading = await connection.channel()
        publishing = await connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        yield publishing, await _taken(reading)


async def dlq_replay(settings: Settings, ids: list[str] | None) -> Replay:
    """Replay the named dead letters (all when ``ids`` is None)."""
    wanted = set(ids) if ids is not None else None
    replayed: list[str] = []
    kept: list[Kept] = []
    failed_for_good: list[FailedForGood] = []
    found: set[str] = set()
    async with _dead_letters(settings) as (publishing, messages):
        for message in messages:
            name = message_name(message)
            came_from = origin(message)
            queue = came_from.queue
            if wanted is not None:
                asked = _asked_for(name, wanted)
                if asked is None:
                    await _put_back(publishing, message)
                    continue
                found.add(asked)
            if not queue:
                why = f"origin unknown: {_NO_ORIGIN}"
            elif (problem := _not_replayable(queue)) is not None:
                why = problem
            else:
                why = await _send_back(publishing, message, queue)
            if why is not None:
                await _put_back(publishing, message)
                kept.append(Kept(id=name, why=why, queue=queue))
                continue
            await message.ack()
            replayed.append(name)
            if _row_failed(message, came_from):
                sources = (message.headers or {}, _json_object(message.body))
                event_id = _first_id(sources, "event_id")
                failed_for_good.append(FailedForGood(id=name, event_id=event_id))
    missing = sorted(wanted - found) if wanted is not None else []
    return Replay(
        replayed=replayed,
        kept=kept,
        missing=missing,
        failed_for_good=failed_for_good,
    )


async def dlq_discard(
    settings: Settings, ids: list[str]
) -> tuple[list[str], list[str]]:
    """Remove the named dead letters for good; the names removed (one a copy),
    and those not found."""
    wanted = set(ids)
    discarded: list[str] = []
    found: set[str] = set()
    async with _dead_letters(settings) as (publishing, messages):
        for message in messages:
            name = message_name(message)
            asked = _asked_for(name, wanted)
            if asked is not None:
                await message.ack()
                discarded.append(name)
                found.add(asked)
            else:
                await _put_back(publishing, message)
    return discarded, sorted(wanted - found)


def _asked_for(name: str, wanted: set[str]) -> str | None:
    """How ``wanted`` names the dead letter called ``name``, if it does: as it
    is, or as ``dlq list`` prints it, its control characters written out."""
    if name in wanted:
        return name
    printed = _printable(name)
    return printed if printed in wanted else None


def _row_failed(message: AbstractIncomingMessage, came_from: Origin) -> bool:
    """Whether the consumer marked the dead letter's notification ``failed``."""
    marked = (message.headers or {}).get(topology.ROW_FAILED_HEADER)
    return marked is True or came_from.reason.startswith(_PERMANENT_FAILURE)


async def _send_back(
    channel: aio_pika.abc.AbstractChannel,
    message: AbstractIncomingMessage,
    queue: str,
) -> str | None:
    """Publish a copy to ``queue``; None once a queue holds it, else why not.

    ``channel`` must be opened with ``on_return_raises``. RabbitMQ sends a
    mandatory message it cannot route back (basic.return) and then confirms it all
    the same; without that option the publish completes as if a queue took it.
    """
    try:
        await channel.default_exchange.publish(
            _without_set_aside_headers(message),
            routing_key=queue,
            mandatory=True,
            timeout=10,
        )
    except aio_pika.exceptions.PublishError:
        # The default exchange routes to every queue by its name: nothing took
        # the copy, so there is no such queue.
        return f"there is no queue {queue}"
    except aio_pika.exceptions.DeliveryError:
        # A nack: RabbitMQ did not take the copy on, as a queue at its length
        # limit with reject-publish answers.
        return f"the queue {queue} refused it"
    return None


async def _put_back(
    channel: aio_pika.abc.AbstractChannel, message: AbstractIncomingMessage
) -> None:
    """Leave ``message`` in the dead-letter queue as a copy that RabbitMQ has not
    counted a delivery of; see the module's docstring.

    ``channel`` must be opened with publisher confirms and ``on_return_raises``.
    Should the copy not be confirmed, the original is handed back as before:
    counted, but never lost.
    """
    try:
        await channel.default_exchange.publish(
            _fresh_copy(message),
            routing_key=topology.DEAD_LETTER_QUEUE,
            mandatory=True,
            timeout=10,
        )
    except (aio_pika.exceptions.DeliveryError, TimeoutError):
        # Returned or refused (a return is a kind of DeliveryError), or no
        # confirm in time: the copy may be missing, so the original stays.
        await message.nack(requeue=True)
        return
    await message.ack()


def _fresh_copy(message: AbstractIncomingMessage) -> aio_pika.Message:
    """``message`` as it was published, but for the count RabbitMQ keeps of its
    deliveries. Its ``user_id`` is left out: RabbitMQ refuses a publish that names
    a user other than the connection's."""
    headers = sendable_headers(message.headers or {})
    headers.pop("x-delivery-count", None)
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        expiration=message.expiration,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


def _without_set_aside_headers(message: AbstractIncomingMessage) -> aio_pika.Message:
    headers = {
        key: value
        for key, value in sendable_headers(message.headers or {}).items()
        if key not in _SET_ASIDE_HEADERS
    }
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        message_id=message.message_id,
        timestamp=message.timestamp,
    )


async def requeue(
    settings: Settings,
    *,
    event_id: UUID | None,
    since: datetime | None,
    until: datetime | None,
) -> list[int]:
    async with _migrated(settings) as conn, conn.transaction():
        return await requeue_failed(conn, event_id=event_id, since=since, until=until)


@asynccontextmanager
async def _migrated(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the database, which has every migration this release
    ships (:class:`NotMigrated` otherwise), set to write to the outbox."""
    where = redact_url(settings.database_url)
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=10)
    except asyncpg.InvalidCatalogNameError:
        raise NotMigrated(
            f"the database at {where} does not exist; create and migrate it with "
            "`make migrate` (notiflow-migrate)"
        ) from None
    try:
        if problem := await preflight.missing_schema(conn, where):
            raise NotMigrated(problem)
        # The outbox stores headers as jsonb, encoded the way the services' pools do.
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
        yield conn
    finally:
        await conn.close()


# Comments the dispatcher never received an event for: none recorded in events
# for them, none waiting in the outbox (read from the bodies of its events).
_UNDISPATCHED = """
SELECT c.id, c.post_id, c.author_id, c.body
FROM comments c
WHERE c.created_at >= $1 AND c.created_at < $2
  AND NOT EXISTS (SELECT FROM events e WHERE e.comment_id = c.id)
  AND NOT EXISTS (
      SELECT FROM outbox o
      WHERE o.routing_key = $3
        AND (convert_from(o.body, 'UTF8')::jsonb ->> 'comment_id')::bigint = c.id
  )
ORDER BY c.id
"""

# How old a comment must be before it counts as never dispatched: younger, its
# event may still be on its way.
SETTLED_SECONDS = 60


async def redispatch(
    settings: Settings, *, since: datetime, until: datetime | None
) -> list[int]:
    """Publish again, through the outbox, the event of every comment written in
    [``since``, ``until``) that the dispatcher never received; their ids.

    Such a comment's event was lost after the outbox gave it to the broker: its
    queue deleted by hand while the event waited there, say. ``until`` is at
    most :data:`SETTLED_SECONDS` ago, so that no event still on its way is sent
    twice (the dispatcher would set the second aside, not notify twice).
    """
    now = datetime.now(UTC)
    latest = now - timedelta(seconds=SETTLED_SECONDS)
    until = latest if until is None else min(until, latest)
    async with _migrated(settings) as conn, conn.transaction():
        rows = await conn.fetch(_UNDISPATCHED, since, until, topology.COMMENT_CREATED)
        events = [
            CommentCreated(
                event_id=uuid4(),
                occurred_at=now,
                comment_id=row["id"],
                post_id=row["post_id"],
                author_id=row["author_id"],
                body=row["body"],
            )
            for row in rows
        ]
        await enqueue(conn, [outgoing_event(event) for event in events])
    return [row["id"] for row in rows]


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time, e.g. 2024-05-01T12:00:00+00:00"
        ) from None
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        # What PostgreSQL is given: a time in UTC, which must still be a date.
        value.astimezone(UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is out of range: in UTC it falls outside years 1 to 9999"
        ) from None
    return value


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an event id (a UUID)"
        ) from None


def parser() -> argparse.ArgumentParser:
    """The command line. Each command's parser is its namespace's ``command_parser``,
    so that a mistake found after parsing is shown with that command's usage."""
    top = argparse.ArgumentParser(
        prog="notiflow-admin",
        description="Inspect, replay and discard dead letters; send failed "
        "notifications again; publish again the events of comments never dispatched.",
    )
    commands = top.add_subparsers(dest="command", required=True)

    dlq = commands.add_parser("dlq", help="the dead-letter queue")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = dlq_commands.add_parser("list", help="show every dead letter and why")
    listing.set_defaults(command_parser=listing)
    replay = dlq_commands.add_parser(
        "replay",
        help="send dead letters back to the queue they came from",
        usage="%(prog)s (--all | MESSAGE_ID [MESSAGE_ID ...])",
        description="Send dead letters back to the queue they came from, and remove "
        "them from the dead-letter queue. Replaying a dead letter set aside after a "
        "permanent failure, or after its attempts ran out, sends nothing: its "
        "notification is failed, and the consumer drops the copy. Give such a "
        "notification another round with "
        "`notiflow-admin requeue-failed`; replay warns on standard error of each "
        "one it replayed.",
    )
    replay.add_argument(
        "ids",
        nargs="*",
        metavar="MESSAGE_ID",
        help="a dead letter's id as `dlq list` shows it; every dead letter with "
        "that id is replayed, as copies of one message share it",
    )
    replay.add_argument("--all", action="store_true", help="replay every dead letter")
    replay.set_defaults(command_parser=replay)
    discard = dlq_commands.add_parser(
        "discard",
        help="remove dead letters for good",
        usage="%(prog)s MESSAGE_ID [MESSAGE_ID ...]",
        description="Remove the named dead letters from the dead-letter queue for "
        "good, sending them nowhere: those no replay can send back (their origin "
        "unknown, or their queue gone), or a message nothing should ever handle.",
    )
    discard.add_argument(
        "ids",
        nargs="+",
        metavar="MESSAGE_ID",
        help="a dead letter's id as `dlq list` shows it; every dead letter with "
        "that id is removed",
    )
    discard.set_defaults(command_parser=discard)

    again = commands.add_parser(
        "requeue-failed",
        help="set failed notifications back to pending and send",
        usage="%(prog)s (--event EVENT_ID | --since ISO [--until ISO])",
    )
    again.add_argument(
        "--event",
        action=Once,
        type=_uuid,
        metavar="EVENT_ID",
        help="the failed rows of one event",
    )
    again.add_argument(
        "--since",
        action=Once,
        type=_timestamp,
        metavar="ISO",
        help="rows that failed at or after this time (UTC unless it names a zone)",
    )
    again.add_argument(
        "--until",
        action=Once,
        type=_timestamp,
        metavar="ISO",
        help="and before this time",
    )
    again.set_defaults(command_parser=again)

    lost = commands.add_parser(
        "redispatch",
        help="publish again the events of comments nobody was notified of",
        usage="%(prog)s --since ISO [--until ISO]",
    )
    lost.add_argument(
        "--since",
        action=Once,
        type=_timestamp,
        metavar="ISO",
        required=True,
        help="comments written at or after this time (UTC unless it names a zone)",
    )
    lost.add_argument(
        "--until",
        action=Once,
        type=_timestamp,
        metavar="ISO",
        help=f"and before this time; at most, and by default, {SETTLED_SECONDS} s ago",
    )
    lost.set_defaults(command_parser=lost)
    return top


def _check(args: argparse.Namespace) -> None:
    if args.command == "dlq" and args.dlq_command == "replay":
        if args.all and args.ids:
            raise UsageError("give either --all or message ids, not both")
        if not args.all and not args.ids:
            raise UsageError("name the messages to replay, or pass --all")
    if args.command == "redispatch":
        if args.until and args.since >= args.until:
            raise UsageError(
                f"--since {args.since.isoformat()} is not before "
                f"--until {args.until.isoformat()}"
            )
        now = datetime.now(UTC)
        if args.since > now:
            raise UsageError(f"--since {args.since.isoformat()} is in the future")
        settled = now - timedelta(seconds=SETTLED_SECONDS)
        if args.since >= settled:
            raise UsageError(
                f"--since {args.since.isoformat()} is within the last "
                f"{SETTLED_SECONDS} s, whose comments may still have their events "
                "on the way and are never redispatched; give an earlier time"
            )
    if args.command == "requeue-failed":
        if args.event is not None and (args.since or args.until):
            raise UsageError("give either --event or --since/--until, not both")
        if args.event is None and args.since is None:
            raise UsageError("choose the rows: --event EVENT_ID or --since ISO")
        if args.since and args.until and args.since >= args.until:
            raise UsageError(
                f"--since {args.since.isoformat()} is not before "
                f"--until {args.until.isoformat()}"
            )


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0:
        # Dated by a clock ahead of this one, or by a producer that got it wrong.
        return f"{_age(-seconds)}-ahead"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


# An event or notification id read from a foreign message may be of any length;
# the listing shows its start and its length, enough to tell it from the others.
_LISTED_ID_CHARS = 40


def _listed_id(text: str) -> str:
    if not text:
        return "-"
    if len(text) <= _LISTED_ID_CHARS:
        return text
    return f"{text[:_LISTED_ID_CHARS]}…({len(text)} characters)"


def _count(number: int, one: str, many: str) -> str:
    """``number`` and what it counts, in the singular only for exactly one."""
    return f"{number} {one if number == 1 else many}"


def _say(text: str) -> None:
    """Print to standard output; a reader that went away raises OutputClosed."""
    try:
        print(_printable(text))
    except BrokenPipeError:
        raise OutputClosed from None


def _complain(text: str) -> None:
    print(_printable(text), file=sys.stderr)


def _printable(text: str) -> str:
    """``text`` with what a terminal would act on written out as escapes.

    Dead letters carry text from outside: a mail server's reply, a message id or a
    header of whoever published the message. A terminal takes escape sequences in
    it as commands (colours, the window title), and a line end would make one
    letter look like two.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


async def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "dlq" and args.dlq_command == "list":
        found = await dlq_list(settings)
        counted = _count(len(found), "dead letter", "dead letters")
        _say(f"{counted} in {topology.DEAD_LETTER_QUEUE}")
        for item in found:
            came_from = f"queue={item.queue}" if item.queue else "origin unknown"
            _say(
                f"{item.id}  age={_age(item.age_seconds)}  {came_from}  "
                f"event={_listed_id(item.event_id)}  "
                f"notification={_listed_id(item.notification_id)}"
            )
            _say(f"    {item.reason or 'no reason given'}")
            if not item.queue:
                _say(f"    cannot be replayed: {_NO_ORIGIN}")
            elif (problem := _not_replayable(item.queue)) is not None:
                _say(f"    cannot be replayed: {problem}")
        return 0
    if args.command == "dlq" and args.dlq_command == "discard":
        discarded, missing = await dlq_discard(settings, args.ids)
        for name in discarded:
            _say(f"discarded {name}")
        for name in missing:
            _complain(f"not in the dead-letter queue: {name}")
        _say(f"{len(discarded)} discarded")
        return 1 if missing else 0
    if args.command == "dlq":
        done = await dlq_replay(settings, None if args.all else args.ids)
        for name in done.replayed:
            _say(f"replayed {name}")
        for item in done.kept:
            _complain(
                f"not replayed: {item.id}: {item.why}; "
                f"it stays in {topology.DEAD_LETTER_QUEUE}"
            )
        for name in done.missing:
            _complain(f"not in the dead-letter queue: {name}")
        for item in done.failed_for_good:
            again = f"--event {item.event_id}" if item.event_id else "--event EVENT_ID"
            # Only the broker is asked: requeue-failed may have sent the row since.
            _complain(
                f"warning: {item.id} was set aside when its notification failed for "
                f"good: replaying it sends nothing while that notification is "
                f"failed; if it still is, send it again with "
                f"`notiflow-admin requeue-failed {again}`"
            )
        summary = f"{len(done.replayed)} replayed"
        if done.kept:
            summary += f", {len(done.kept)} left in {topology.DEAD_LETTER_QUEUE}"
            if unknown := sum(1 for item in done.kept if not item.queue):
                summary += f" ({unknown} of unknown origin)"
        _say(summary)
        return 1 if done.kept or done.missing else 0
    if args.command == "redispatch":
        comments = await redispatch(settings, since=args.since, until=args.until)
        for comment_id in comments:
            _say(f"redispatched comment {comment_id}")
        counted = _count(len(comments), "comment", "comments")
        _say(f"{counted} without an event published again")
        return 0
    ids = await requeue(
        settings, event_id=args.event, since=args.since, until=args.until
    )
    # One line per row, as replay prints one per message, and the count last,
    # where a long run's output ends on a terminal.
    for notification_id in sorted(ids):
        _say(f"requeued {notification_id}")
    counted = _count(len(ids), "failed notification", "failed notifications")
    _say(f"{counted} set back to pending and enqueued")
    return 0


def _flush_stdout() -> None:
    # Output to a pipe is buffered: a short report reaches the pipe only here.
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise OutputClosed from None


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so the interpreter's own flush at exit
    does not fail on the closed pipe a second time and print a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    args, extra = parser().parse_known_args(argv)
    # argparse reports arguments a command does not take from the top level, with
    # the top-level usage; they belong to the command given.
    if extra:
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _check(args)
    except UsageError as exc:
        args.command_parser.error(str(exc))
    settings = settings or load_or_exit(Settings)
    # The broker clients log their own line about a failed connection; this tool
    # says it once, naming the server.
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    try:
        code = asyncio.run(run(args, settings))
        _flush_stdout()
    except OutputClosed:
        _silence_stdout()
        return _EXIT_OUTPUT_CLOSED
    except NotMigrated as exc:
        print(f"notiflow-admin: {exc}", file=sys.stderr)
        return 1
    # A ConnectionError too: answered before the other unreachable cases.
    except aio_pika.exceptions.ProbableAuthenticationError as exc:
        print(
            f"notiflow-admin: the broker at {redact_url(settings.amqp_url)} refused "
            f"the login: check the user, the password and the virtual host in "
            f"NOTIFLOW_AMQP_URL ({exc})",
            file=sys.stderr,
        )
        return 1
    except _UNREACHABLE as exc:
        return _cannot_reach(args, settings, exc)
    except OSError as exc:
        if exc.errno not in _NO_ROUTE:
            raise
        return _cannot_reach(args, settings, exc)
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        # SQLSTATE class 28: an unknown role, a wrong password, no pg_hba entry.
        print(
            f"notiflow-admin: the database at {redact_url(settings.database_url)} "
            f"refused the login ({exc}): check the user and the password in "
            "NOTIFLOW_DATABASE_URL",
            file=sys.stderr,
        )
        return 1
    except asyncpg.PostgresError as exc:
        print(f"notiflow-admin: the database refused: {exc}", file=sys.stderr)
        return 1
    except DeadLettersBusy:
        print(
            "notiflow-admin: another notiflow-admin dlq command is holding the dead "
            f"letters of the virtual host {_vhost(settings.amqp_url)!r} at "
            f"{redact_url(settings.amqp_url)}; nothing was done: run this one once "
            "that one has finished",
            file=sys.stderr,
        )
        return 1
    except NoDeadLetterQueue:
        print(
            f"notiflow-admin: the virtual host {_vhost(settings.amqp_url)!r} at "
            f"{redact_url(settings.amqp_url)} has no queue "
            f"{topology.DEAD_LETTER_QUEUE}: no notiflow service has started there, "
            "or the queue was deleted since (a service declares it again before it "
            "sets a message aside), so nothing is waiting in it; check that "
            "NOTIFLOW_AMQP_URL names the virtual host the services use",
            file=sys.stderr,
        )
        return 1
    except ChannelAccessRefused as exc:
        vhost = _vhost(settings.amqp_url)
        user = urlsplit(settings.amqp_url).username or "guest"
        print(
            f"notiflow-admin: the broker at {redact_url(settings.amqp_url)} refused "
            f"access ({exc}): give the user in "
            f"NOTIFLOW_AMQP_URL the permissions the services have on the virtual "
            f"host {vhost!r}, e.g. rabbitmqctl set_permissions -p {vhost} "
            f"{unquote(user)} '.*' '.*' '.*'",
            file=sys.stderr,
        )
        return 1
    except aio_pika.exceptions.AMQPError as exc:
        where = f"the broker at {redact_url(settings.amqp_url)}"
        if "Connection.OpenOk" in str(exc):
            # RabbitMQ closes the connection as it opens for a virtual host that
            # does not exist or that the user may not use; aiormq reports that
            # as an unexpected frame, keeping none of RabbitMQ's words.
            print(
                f"notiflow-admin: {where} closed the connection as it opened the "
                f"virtual host {_vhost(settings.amqp_url)!r}: it does not exist, or "
                "the user in NOTIFLOW_AMQP_URL may not use it",
                file=sys.stderr,
            )
        else:
            print(f"notiflow-admin: {where} refused: {exc}", file=sys.stderr)
        return 1
    return code


def _vhost(url: str) -> str:
    """The virtual host an AMQP URL names, as the clients read it."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _cannot_reach(
    args: argparse.Namespace, settings: Settings, exc: BaseException
) -> int:
    # The dead-letter commands talk to the broker only, requeue to the database.
    if args.command == "dlq":
        where = f"the broker at {redact_url(settings.amqp_url)}"
        start, setting = preflight.AMQP_HINT, "NOTIFLOW_AMQP_URL"
    else:
        where = f"the database at {redact_url(settings.database_url)}"
        start, setting = preflight.PG_HINT, "NOTIFLOW_DATABASE_URL"
    if _refused(exc):
        hint = start  # nothing listens there: a server that is not running
    elif isinstance(exc, socket.gaierror):
        hint = f"check the host name in {setting}"
    else:
        hint = f"check that {setting} names the server and port, and its TLS options"
    print(
        f"notiflow-admin: cannot reach {where} ({_reason(exc)}); {hint}",
        file=sys.stderr,
    )
    return 1


def _refused(exc: BaseException) -> bool:
    """Whether the connection was refused: aiormq passes the errno as its first
    argument rather than raising ConnectionRefusedError."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and exc.args and isinstance(exc.args[0], int):
        code = exc.args[0]
    return code == errno.ECONNREFUSED


def _reason(exc: BaseException) -> str:
    """What a failed connection says, without the exception's own dress: aiormq
    gives an errno and a sentence as its arguments."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if exc.args and isinstance(exc.args[-1], str):
        return exc.args[-1]
    return str(exc) or type(exc).__name__
