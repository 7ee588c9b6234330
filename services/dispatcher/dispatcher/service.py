"""From CommentCreated events to notification rows and their deliveries.

A batch of events is handled in one transaction, with a fixed handful of statements
whatever its size: the event rows, one notification row per (event, recipient,
channel type), and one outbox message per row that has something to deliver. The
event row doubles as the idempotency marker: if it already exists, a previous
delivery of that event committed all of the above, and there is nothing to do.

An event that names a comment, post or commenter that does not exist is answered
with a :class:`DeadLetter` and leaves nothing stored, not even its event row, while
the other events of its batch are stored as usual. Copies of one event id within a
batch are one event: the first copy decides, and the others end as it did.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from contracts import topology, tracing
from contracts.consumer import DeadLetter
from contracts.messages import (
    MAX_BATCH_DELIVERIES,
    CommentCreated,
    DeliveryBatch,
    DeliveryRequested,
)
from contracts.outbox import Outgoing, enqueue
from dispatcher import recipients as who
from dispatcher import repository as sql
from dispatcher.channels import ChannelConfigs, ChannelFile
from dispatcher.templates import Renderer

logger = logging.getLogger(__name__)

REPLY_CHANNEL = "comment.reply"
MENTION_CHANNEL = "comment.mention"
EXCERPT_CHARS = 280


@dataclass
class Outcome:
    duplicate: bool = False
    rows: int = 0
    pending: int = 0
    skipped: int = 0
    # (type, channel, status) of each row this call stored
    stored: list[tuple[str, str, str]] = field(default_factory=list)


class Dispatcher:
    def __init__(
        self,
        channels: ChannelConfigs,
        renderer: Renderer,
        public_url: str,
        *,
        per_message: int = MAX_BATCH_DELIVERIES,
    ) -> None:
        """``per_message``: deliveries one message may carry; 1 sends each alone."""
        if not 1 <= per_message <= MAX_BATCH_DELIVERIES:
            raise ValueError(
                f"deliveries per message must be 1 to {MAX_BATCH_DELIVERIES}"
            )
        self._channels = channels
        self._renderer = renderer
        self._public_url = public_url.rstrip("/")
        self._per_message = per_message

    async def handle(self, conn: asyncpg.Connection, event: CommentCreated) -> Outcome:
        """Dispatch one event; raise :class:`DeadLetter` if it must be set aside."""
        (result,) = await self.handle_many(conn, [event])
        if isinstance(result, DeadLetter):
            raise result
        return result

    async def handle_many(
        self,
        conn: asyncpg.Connection,
        events: Sequence[CommentCreated],
        *,
        traces: Sequence[Mapping[str, Any]] | None = None,
        outbox: list[asyncpg.Record] | None = None,
    ) -> list[Outcome | DeadLetter]:
        """Dispatch ``events`` in ``conn``'s transaction: one result each, in order.

        ``traces`` holds each event's trace context (what :func:`tracing.inject`
        gives in that event's consumer), carried onto its deliveries; without it,
        every delivery continues the current trace.

        With ``outbox``, the delivery messages are stored for a hand-off and their
        outbox rows added to it: give them to the process's relay once the
        transaction commits (:meth:`contracts.outbox.OutboxRelay.hand_off`).
        """
        if not events:
            return []
        results: list[Outcome | DeadLetter | None] = [None] * len(events)
        first: dict[uuid.UUID, int] = {}
        for index, event in enumerate(events):
            first.setdefault(event.event_id, index)

        fresh = await self._claim(conn, [events[i] for i in first.values()])
        for index in first.values():
            if events[index].event_id not in fresh:
                results[index] = Outcome(duplicate=True)
        claimed = [i for i in first.values() if events[i].event_id in fresh]

        posts, dead = await self._check(conn, events, claimed)
        for index, reason in dead.items():
            results[index] = DeadLetter(reason)
        if dead:
            await conn.execute(sql.DELETE_EVENTS, [events[i].event_id for i in dead])

        valid = [i for i in claimed if i not in dead]
        if valid:
            outcomes = await self._dispatch(conn, events, valid, posts, traces, outbox)
            for index, outcome in zip(valid, outcomes, strict=True):
                results[index] = outcome

        for index, event in enumerate(events):
            if results[index] is None:
                # A later copy of an event id ends as its first copy did.
                decided = results[first[event.event_id]]
                results[index] = (
                    DeadLetter(decided.reason)
                    if isinstance(decided, DeadLetter)
                    else Outcome(duplicate=True)
                )
        return [result for result in results if result is not None]

    async def _claim(
        self, conn: asyncpg.Connection, events: list[CommentCreated]
    ) -> set[uuid.UUID]:
        """Insert the event rows; return the ids that were not stored before."""
        ordered = sorted(events, key=lambda e: e.event_id)
        inserted = await conn.fetch(
            sql.INSERT_EVENTS,
            [e.event_id for e in ordered],
            ["comment.created"] * len(ordered),
            [e.model_dump(mode="json") for e in ordered],
            [e.occurred_at for e in ordered],
        )
        return {row["id"] for row in inserted}

    async def _check(
        self,
        conn: asyncpg.Connection,
        events: Sequence[CommentCreated],
        claimed: list[int],
    ) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
        """The post of each claimed event, and why the others must be set aside."""
        if not claimed:
            return {}, {}
        ids = sorted({events[i].comment_id for i in claimed})
        comments = {row["id"]: row for row in await conn.fetch(sql.COMMENTS, ids)}
        posts: dict[int, dict[str, Any]] = {}
        dead: dict[int, str] = {}
        for index in claimed:
            event = events[index]
            # The event is a claim about stored rows; notify nobody about a comment
            # that is not there or not where the event says.
            comment = comments.get(event.comment_id)
            if comment is None or (comment["post_id"], comment["author_id"]) != (
                event.post_id,
                event.author_id,
            ):
                dead[index] = (
                    f"comment {event.comment_id} by user {event.author_id} on post "
                    f"{event.post_id} does not exist"
                )
            elif comment["body"] != event.body:
                # Comments are never edited: another body is not this comment's,
                # and its mentions must not reach anyone.
                dead[index] = (
                    f"comment {event.comment_id}: the event's body differs from "
                    f"the stored comment's"
                )
            elif comment["found_post_id"] is None:
                dead[index] = (
                    f"post {event.post_id} of comment {event.comment_id} does not exist"
                )
            elif not comment["author_exists"]:
                dead[index] = f"commenter {event.author_id} does not exist"
            else:
                posts[index] = {
                    "id": comment["found_post_id"],
                    "title": comment["post_title"],
                    "author_id": comment["post_author_id"],
                }
        return posts, dead

    async def _dispatch(
        self,
        conn: asyncpg.Connection,
        events: Sequence[CommentCreated],
        valid: list[int],
        posts: dict[int, dict[str, Any]],
        traces: Sequence[Mapping[str, Any]] | None,
        outbox: list[asyncpg.Record] | None,
    ) -> list[Outcome]:
        """Store the rows and deliveries of the ``valid`` events; their outcomes."""
        pairs = sorted({(events[i].post_id, events[i].comment_id) for i in valid})
        earlier: dict[int, list[int]] = defaultdict(list)
        for row in await conn.fetch(
            sql.PARTICIPANTS, [p for p, _ in pairs], [c for _, c in pairs]
        ):
            earlier[row["comment_id"]].append(row["author_id"])

        names = {i: who.mentioned_usernames(events[i].body) for i in valid}
        ids = {events[i].author_id for i in valid}
        ids.update(posts[i]["author_id"] for i in valid)
        ids.update(user for i in valid for user in earlier[events[i].comment_id])
        wanted = sorted({name for i in valid for name in names[i]})
        found = await conn.fetch(sql.USERS, sorted(ids), wanted)
        users = {row["id"]: row for row in found}
        by_name = {row["username"]: row["id"] for row in found}
        disabled = {(row["id"], t) for row in found for t in row["disabled_types"]}

        rows: list[tuple[Any, ...]] = []
        for index in valid:
            event = events[index]
            recipients = who.resolve(
                commenter_id=event.author_id,
                post_author_id=posts[index]["author_id"],
                participant_ids=earlier[event.comment_id],
                mentioned_ids=[by_name[n] for n in names[index] if n in by_name],
            )
            commenter = users[event.author_id]
            rows.extend(
                (event.event_id, event.occurred_at, *row)
                for row in self._rows(
                    event, posts[index], commenter, recipients, users, disabled
                )
            )
        if not rows:
            return [Outcome() for _ in valid]

        # (event, user, type): the unique key, in the same order in every dispatcher.
        rows.sort(key=lambda r: (r[0], r[2], r[6]))
        stored = await conn.fetch(
            sql.INSERT_NOTIFICATIONS,
            *(list(column) for column in zip(*rows, strict=True)),
        )
        by_event: dict[uuid.UUID, list[asyncpg.Record]] = defaultdict(list)
        for row in sorted(stored, key=lambda r: r["id"]):
            by_event[row["event_id"]].append(row)

        if traces is None:
            traces = [tracing.inject()] * len(events)
        deliveries: list[Outgoing] = []
        outcomes: list[Outcome] = []
        for index in valid:
            event = events[index]
            mine = by_event[event.event_id]
            pending = [row for row in mine if row["status"] == "pending"]
            deliveries.extend(
                _messages(event, pending, traces[index], self._per_message)
            )
            outcomes.append(
                Outcome(
                    rows=len(mine),
                    pending=len(pending),
                    skipped=len(mine) - len(pending),
                    stored=[(r["type"], r["channel"], r["status"]) for r in mine],
                )
            )
        stored_messages = await enqueue(conn, deliveries, hand_off=outbox is not None)
        if outbox is not None:
            outbox.extend(stored_messages)
        return outcomes

    def _rows(
        self,
        event: CommentCreated,
        post: Mapping[str, Any],
        commenter: asyncpg.Record,
        recipients: list[who.Recipient],
        users: dict[int, asyncpg.Record],
        disabled: set[tuple[int, str]],
    ) -> list[tuple[Any, ...]]:
        config: ChannelFile = self._channels.current()
        url = f"{self._public_url}/?post={event.post_id}#comment-{event.comment_id}"
        rows: list[tuple[Any, ...]] = []
        for recipient in recipients:
            user = users.get(recipient.user_id)
            if user is None:
                continue
            name = MENTION_CHANNEL if recipient.mentioned else REPLY_CHANNEL
            channel = config.channels.get(name)
            if channel is None or not channel.enabled:
                continue
            context = {
                "recipient": _person(user),
                "commenter": _person(commenter),
                "post": {"id": post["id"], "title": post["title"]},
                "comment": {
                    "id": event.comment_id,
                    "body": event.body,
                    "excerpt": _excerpt(event.body),
                },
                "reasons": recipient.reasons,
                "url": url,
            }
            rendered = self._renderer.render(channel.template, context)
            metadata = {
                "reasons": recipient.reasons,
                "post_id": event.post_id,
                "comment_id": event.comment_id,
                "commenter": _person(commenter),
                "url": url,
            }
            for channel_type in channel.types:
                status, error = "pending", None
                if (user["id"], channel_type) in disabled:
                    status, error = "skipped", f"{channel_type} disabled by preference"
                elif channel_type == "email" and not user["email"]:
                    status, error = "skipped", "user has no email address"
                extra = {"html": rendered.html} if channel_type == "email" else {}
                rows.append(
                    (
                        user["id"],
                        user["email"],
                        rendered.title,
                        rendered.message,
                        channel_type,
                        name,
                        channel.priority,
                        {**metadata, **extra},
                        status,
                        error,
                    )
                )
        return rows


def _messages(
    event: CommentCreated,
    rows: list[asyncpg.Record],
    trace: Mapping[str, Any],
    per_message: int,
) -> list[Outgoing]:
    """The messages for one event's pending rows.

    Rows of one channel type and priority travel together, up to ``per_message``
    in a :class:`DeliveryBatch`; a row alone is sent as a plain DeliveryRequested.
    """
    groups: dict[tuple[str, int], list[DeliveryRequested]] = defaultdict(list)
    for row in rows:
        groups[(row["type"], row["priority"])].append(
            DeliveryRequested(
                notification_id=row["id"],
                event_id=event.event_id,
                user_id=row["user_id"],
                type=row["type"],
                channel=row["channel"],
                priority=row["priority"],
                event_occurred_at=event.occurred_at,
            )
        )
    messages: list[Outgoing] = []
    for (type_, priority), group in groups.items():
        for start in range(0, len(group), per_message):
            chunk = group[start : start + per_message]
            first = chunk[0].notification_id
            headers: dict[str, Any] = {**trace, "event_id": str(event.event_id)}
            message: DeliveryRequested | DeliveryBatch
            if len(chunk) == 1:
                headers["notification_id"] = first
                message_id, message = f"notification-{first}", chunk[0]
            else:
                message_id = f"notifications-{first}+{len(chunk)}"
                message = DeliveryBatch(deliveries=chunk)
            messages.append(
                Outgoing(
                    exchange=topology.DELIVERIES_EXCHANGE,
                    routing_key=type_,
                    message_id=message_id,
                    priority=priority,
                    headers=headers,
                    message=message,
                )
            )
    return messages


def _person(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "username": row["username"],
        "display_name": row["display_name"],
    }


def _excerpt(body: str) -> str:
    flat = " ".join(body.split())
    return flat if len(flat) <= EXCERPT_CHARS else flat[: EXCERPT_CHARS - 1] + "…"
