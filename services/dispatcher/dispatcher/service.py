"""From CommentCreated events to notification rows and their deliveries.

A batch of events takes two statements whatever its size: one reads what the batch
needs (the comments, their threads, the people), one stores the event rows, one
notification row per (event, recipient, channel type), from the channel
:func:`channel_per_type` chooses, and the delivery messages of the rows that have
something to deliver, all committed together. The event row doubles as the
idempotency marker: if it already exists, a previous delivery of that event
committed all of the above, and there is nothing to do. The event row also records
its comment, which one event only may notify about: an event under another id about
a comment already dispatched is set aside with a :class:`DeadLetter` naming the
event that was, and of two stored at the same moment the second is a duplicate.

An event that names a comment, post or commenter that does not exist is answered
with a :class:`DeadLetter` and leaves nothing stored, not even its event row, while
the other events of its batch are stored as usual. Copies of one event id within a
batch are one event: the first copy decides, and the others end as it did.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from contracts import topology, tracing
from contracts.auth import unsubscribe_url
from contracts.consumer import DeadLetter
from contracts.mentions import MAX_MENTIONS, mentioned_usernames
from contracts.messages import (
    MAX_BATCH_DELIVERIES,
    CommentCreated,
    DeliveryBatch,
    DeliveryRequested,
    Message,
)
from dispatcher import recipients as who
from dispatcher import repository as sql
from dispatcher.channels import MENTION, REPLY, ChannelConfigs, ChannelFile
from dispatcher.templates import Renderer

logger = logging.getLogger(__name__)

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
        secret_key: str,
        per_message: int = MAX_BATCH_DELIVERIES,
    ) -> None:
        """``secret_key`` signs the unsubscribe links of emails; ``per_message``:
        deliveries one message may carry, 1 sends each alone."""
        if not 1 <= per_message <= MAX_BATCH_DELIVERIES:
            raise ValueError(
                f"deliveries per message must be 1 to {MAX_BATCH_DELIVERIES}"
            )
        self._channels = channels
        self._renderer = renderer
        self._public_url = public_url.rstrip("/")
        self._secret_key = secret_key
        self._per_message = per_message

    def refresh(self) -> None:
        """Take up the channel configuration and the templates it names as they are
        on disk now, as the next event would.

        Each dispatcher keeps the last good version of each file it has seen; one
        that looked only when events came would see only the versions on disk
        then. Called every second or so, it has every dispatcher sharing the
        files take up each good version that stays on disk that long, busy or
        idle. A version of the configuration refused for a template set that was
        missing or broken then is read again, and taken up once the set is fixed.
        """
        config = self._channels.recheck()
        names = sorted({channel.template for channel in config.channels.values()})
        for name in names:
            self._renderer.look(name)
        self._renderer.forget_all_but(names)

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
        outbox: list[Mapping[str, Any]] | None = None,
    ) -> list[Outcome | DeadLetter]:
        """Dispatch ``events``: one result each, in order.

        Two statements: one reads what the batch needs, one stores everything. The
        second commits on its own, unless ``conn`` is in a transaction.

        ``traces`` holds each event's trace context (what :func:`tracing.inject`
        gives in that event's consumer), carried onto its deliveries; without it,
        every delivery continues the current trace.

        With ``outbox``, the delivery messages are stored for a hand-off and their
        outbox rows added to it: give them to the process's relay once they are
        committed (:meth:`contracts.outbox.OutboxRelay.hand_off`).
        """
        if not events:
            return []
        results: list[Outcome | DeadLetter | None] = [None] * len(events)
        first: dict[uuid.UUID, int] = {}
        for index, event in enumerate(events):
            first.setdefault(event.event_id, index)
        unique = list(first.values())
        # The comments service takes no body mentioning more; an event that does
        # notifies the first of them.
        names = {i: mentioned_usernames(events[i].body)[:MAX_MENTIONS] for i in unique}

        facts = await conn.fetchrow(
            sql.LOOKUP,
            [events[i].event_id for i in unique],
            [events[i].comment_id for i in unique],
            [events[i].post_id for i in unique],
            sorted({name for i in unique for name in names[i]}),
        )
        stored_before = set(facts["stored"])
        for index in unique:
            if events[index].event_id in stored_before:
                results[index] = Outcome(duplicate=True)
        fresh = [i for i in unique if events[i].event_id not in stored_before]

        comments = {c["id"]: c for c in _named(sql.COMMENT_FIELDS, facts["comments"])}
        posts, dead, later = _check(events, fresh, comments, dict(facts["dispatched"]))
        for index, reason in dead.items():
            results[index] = DeadLetter(reason)

        valid = [i for i in fresh if i in posts]
        lost: list[int] = []
        if valid:
            outcomes = await self._store(
                conn, events, valid, posts, facts, names, traces, outbox
            )
            for index, outcome in zip(valid, outcomes, strict=True):
                results[index] = outcome
                if outcome.duplicate:
                    lost.append(index)
        if later or lost:
            await self._name_the_dispatched(conn, events, later, lost, results)

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

    async def _name_the_dispatched(
        self,
        conn: asyncpg.Connection,
        events: Sequence[CommentCreated],
        later: list[int],
        lost: list[int],
        results: list[Outcome | DeadLetter | None],
    ) -> None:
        """Set aside, naming the event that dispatched their comment, the events
        ``later`` in the batch about a comment an earlier one is about, and those
        ``lost`` to another dispatcher storing an event about the same comment.

        Which event that is shows only once the batch is stored, and the other
        dispatcher's commit: a statement of its own, run only for such events.
        """
        comment_ids = sorted({events[i].comment_id for i in (*later, *lost)})
        stored = dict(await conn.fetch(sql.DISPATCHED, comment_ids))
        for index in (*later, *lost):
            event = events[index]
            winner = stored.get(event.comment_id)
            if winner == event.event_id:
                continue  # the same event, stored by another dispatcher
            if winner is None:
                # Its batch-mate was set aside after all (stored by nobody).
                results[index] = DeadLetter(
                    f"comment {event.comment_id} is named by another event of "
                    "its batch; a comment is notified once"
                )
            else:
                results[index] = DeadLetter(
                    _dispatched_already(event.comment_id, winner)
                )

    async def _store(
        self,
        conn: asyncpg.Connection,
        events: Sequence[CommentCreated],
        valid: list[int],
        posts: dict[int, dict[str, Any]],
        facts: asyncpg.Record,
        names: dict[int, list[str]],
        traces: Sequence[Mapping[str, Any]] | None,
        outbox: list[Mapping[str, Any]] | None,
    ) -> list[Outcome]:
        """Store the ``valid`` events, their rows and deliveries; their outcomes."""
        earlier: dict[int, list[int]] = defaultdict(list)
        for row in _named(sql.EARLIER_FIELDS, facts["earlier"]):
            earlier[row["comment_id"]].append(row["author_id"])
        found = _named(sql.USER_FIELDS, facts["users"])
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
        # (event, user, type): the unique key, in the same order in every dispatcher.
        rows.sort(key=lambda r: (r[0], r[2], r[6]))
        row_columns = [list(column) for column in zip(*rows, strict=True)] or [
            [] for _ in range(sql.ROW_PARAMETERS)
        ]

        if traces is None:
            traces = [tracing.inject()] * len(events)
        ordered = sorted(valid, key=lambda i: events[i].event_id)
        payloads = [events[i].model_dump(mode="json") for i in ordered]
        result = await conn.fetchrow(
            sql.STORE,
            "on" if outbox is not None else "off",
            [events[i].event_id for i in ordered],
            payloads,
            [events[i].occurred_at for i in ordered],
            [payload["occurred_at"] for payload in payloads],
            [{k: str(v) for k, v in traces[i].items()} for i in ordered],
            *row_columns,
            self._per_message,
            _version(DeliveryRequested),
            _version(DeliveryBatch),
            topology.DELIVERIES_EXCHANGE,
        )
        if outbox is not None:
            for row in _named(sql.QUEUED_FIELDS, result["queued"]):
                row["headers"] = json.loads(row["headers"])
                outbox.append(row)

        fresh = set(result["fresh"])
        by_event: dict[uuid.UUID, list[dict[str, Any]]] = defaultdict(list)
        for row in sorted(
            _named(sql.NOTIFICATION_FIELDS, result["stored"]), key=lambda r: r["id"]
        ):
            by_event[row["event_id"]].append(row)
        outcomes: list[Outcome] = []
        for index in valid:
            event_id = events[index].event_id
            if event_id not in fresh:
                # Stored by another dispatcher since the lookup.
                outcomes.append(Outcome(duplicate=True))
                continue
            mine = by_event[event_id]
            pending = sum(1 for row in mine if row["status"] == "pending")
            outcomes.append(
                Outcome(
                    rows=len(mine),
                    pending=pending,
                    skipped=len(mine) - pending,
                    stored=[(r["type"], r["channel"], r["status"]) for r in mine],
                )
            )
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
            chosen = channel_per_type(recipient.reasons, config)
            context = {
                "recipient": _person(user),
                "commenter": _person(commenter),
                "post": {"id": post["id"], "title": post["title"]},
                "comment": {
                    "id": event.comment_id,
                    "body": _one_line_end(event.body),
                    "excerpt": _excerpt(event.body),
                },
                "reasons": recipient.reasons,
                "url": url,
                "unsubscribe_url": unsubscribe_url(
                    self._public_url, user["id"], self._secret_key
                ),
            }
            rendered = {
                name: self._renderer.render(config.channels[name].template, context)
                for name in dict.fromkeys(chosen.values())
            }
            metadata = {
                "reasons": recipient.reasons,
                "post_id": event.post_id,
                "comment_id": event.comment_id,
                "commenter": _person(commenter),
                "url": url,
            }
            for channel_type, name in chosen.items():
                status, error = "pending", None
                if (user["id"], channel_type) in disabled:
                    status, error = "skipped", f"{channel_type} disabled by preference"
                elif channel_type == "email" and not user["email"]:
                    status, error = "skipped", "user has no email address"
                text = rendered[name]
                message, extra = text.message, {}
                if channel_type == "email":
                    message, extra = text.email_text, {"html": text.html}
                rows.append(
                    (
                        user["id"],
                        user["email"],
                        text.title,
                        message,
                        channel_type,
                        name,
                        config.channels[name].priority,
                        {**metadata, **extra},
                        status,
                        error,
                    )
                )
        return rows


# Who each channel is for, the most specific first: on a channel type both deliver,
# a recipient both apply to hears from the first, and from the second on the
# types only it delivers, so switching one channel off or narrowing its types
# never takes away what the other owes.
AUDIENCES: tuple[tuple[str, frozenset[str]], ...] = (
    (MENTION, frozenset({who.MENTIONED})),
    (REPLY, frozenset({who.AUTHOR, who.PARTICIPANT})),
)


def channel_per_type(reasons: Sequence[str], config: ChannelFile) -> dict[str, str]:
    """The channel that notifies someone with these ``reasons`` on each channel
    type, by type; a type no enabled channel for them delivers is left out."""
    chosen: dict[str, str] = {}
    for name, audience in AUDIENCES:
        channel = config.channels.get(name)
        if channel is None or not channel.enabled or audience.isdisjoint(reasons):
            continue
        for channel_type in channel.types:
            chosen.setdefault(channel_type, name)
    return chosen


def _check(
    events: Sequence[CommentCreated],
    fresh: list[int],
    comments: Mapping[int, Mapping[str, Any]],
    dispatched: Mapping[int, uuid.UUID],
) -> tuple[dict[int, dict[str, Any]], dict[int, str], list[int]]:
    """The post of each fresh event to store, why others must be set aside, and
    which others are about a comment an event before them in the batch is about.

    ``dispatched`` gives, for a comment some event under another id was stored
    for, that event's id: one comment is notified once, whatever event names it.
    """
    posts: dict[int, dict[str, Any]] = {}
    dead: dict[int, str] = {}
    later: list[int] = []
    claimed: set[int] = set()
    for index in fresh:
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
        elif (earlier := dispatched.get(event.comment_id)) is not None:
            dead[index] = _dispatched_already(event.comment_id, earlier)
        elif event.comment_id in claimed:
            # Another event of this batch is about the same comment: the one of
            # them that is stored is named once the batch is.
            later.append(index)
        else:
            claimed.add(event.comment_id)
            posts[index] = {
                "id": comment["found_post_id"],
                "title": comment["post_title"],
                "author_id": comment["post_author_id"],
            }
    return posts, dead, later


def _dispatched_already(comment_id: int, event_id: uuid.UUID) -> str:
    return (
        f"comment {comment_id} was dispatched already, by event {event_id}; "
        "a comment is notified once"
    )


def _named(
    fields: tuple[str, ...], records: Sequence[tuple[Any, ...]]
) -> list[dict[str, Any]]:
    """Anonymous records (tuples) as dicts, by the names of their positions."""
    return [dict(zip(fields, record, strict=True)) for record in records]


def _version(model: type[Message]) -> str:
    return f"{model.MAJOR}.{model.MINOR}"


def _person(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "username": row["username"],
        "display_name": row["display_name"],
    }


def _one_line_end(body: str) -> str:
    """``body`` with its line ends as ``\n``: a template breaking lines at each
    (the HTML email's ``<br>``) breaks them where the text part does, whatever
    ends the writer's lines, ``\r\n`` or a lone ``\r``."""
    return body.replace("\r\n", "\n").replace("\r", "\n")


def _excerpt(body: str) -> str:
    flat = " ".join(body.split())
    return flat if len(flat) <= EXCERPT_CHARS else flat[: EXCERPT_CHARS - 1] + "…"
