"""From a CommentCreated event to notification rows and their deliveries.

Everything happens in one transaction: the event row, one notification row per
(recipient, channel type), and one outbox message per row that has something to
deliver. The event row doubles as the idempotency marker: if it already exists, a
previous delivery of this event committed all of the above, and there is nothing to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from contracts import topology, tracing
from contracts.consumer import DeadLetter
from contracts.messages import CommentCreated, DeliveryRequested
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
        self, channels: ChannelConfigs, renderer: Renderer, public_url: str
    ) -> None:
        self._channels = channels
        self._renderer = renderer
        self._public_url = public_url.rstrip("/")

    async def handle(self, conn: asyncpg.Connection, event: CommentCreated) -> Outcome:
        inserted = await conn.fetchval(
            sql.INSERT_EVENT,
            event.event_id,
            "comment.created",
            event.model_dump(mode="json"),
            event.occurred_at,
        )
        if inserted is None:
            return Outcome(duplicate=True)

        # The event is a claim about stored rows; notify nobody about a comment
        # that is not there or not where the event says.
        comment = await conn.fetchrow(sql.COMMENT, event.comment_id)
        if comment is None or (comment["post_id"], comment["author_id"]) != (
            event.post_id,
            event.author_id,
        ):
            raise DeadLetter(
                f"comment {event.comment_id} by user {event.author_id} on post "
                f"{event.post_id} does not exist"
            )
        post = await conn.fetchrow(sql.POST, event.post_id)
        if post is None:
            raise DeadLetter(
                f"post {event.post_id} of comment {event.comment_id} does not exist"
            )
        participants = await conn.fetch(
            sql.PARTICIPANTS, event.post_id, event.comment_id
        )
        names = who.mentioned_usernames(event.body)
        mentioned = await conn.fetch(sql.USERS_BY_NAME, names) if names else []

        recipients = who.resolve(
            commenter_id=event.author_id,
            post_author_id=post["author_id"],
            participant_ids=[r["author_id"] for r in participants],
            mentioned_ids=[r["id"] for r in mentioned],
        )
        ids = [r.user_id for r in recipients] + [event.author_id]
        users = {r["id"]: r for r in await conn.fetch(sql.USERS_BY_ID, ids)}
        commenter = users.get(event.author_id)
        if commenter is None:
            raise DeadLetter(f"commenter {event.author_id} does not exist")
        disabled = {
            (r["user_id"], r["type"]) for r in await conn.fetch(sql.DISABLED_TYPES, ids)
        }

        rows = self._rows(event, post, commenter, recipients, users, disabled)
        if not rows:
            return Outcome()
        stored = await conn.fetch(
            sql.INSERT_NOTIFICATIONS,
            event.event_id,
            event.occurred_at,
            *(list(column) for column in zip(*rows, strict=True)),
        )
        deliveries = [
            Outgoing(
                exchange=topology.DELIVERIES_EXCHANGE,
                routing_key=row["type"],
                message_id=f"notification-{row['id']}",
                priority=row["priority"],
                headers=tracing.inject(
                    {"event_id": str(event.event_id), "notification_id": row["id"]}
                ),
                message=DeliveryRequested(
                    notification_id=row["id"],
                    event_id=event.event_id,
                    user_id=row["user_id"],
                    type=row["type"],
                    channel=row["channel"],
                    priority=row["priority"],
                    event_occurred_at=event.occurred_at,
                ),
            )
            for row in stored
            if row["status"] == "pending"
        ]
        await enqueue(conn, deliveries)
        return Outcome(
            rows=len(stored),
            pending=len(deliveries),
            skipped=len(stored) - len(deliveries),
            stored=[(r["type"], r["channel"], r["status"]) for r in stored],
        )

    def _rows(
        self,
        event: CommentCreated,
        post: asyncpg.Record,
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


def _person(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "username": row["username"],
        "display_name": row["display_name"],
    }


def _excerpt(body: str) -> str:
    flat = " ".join(body.split())
    return flat if len(flat) <= EXCERPT_CHARS else flat[: EXCERPT_CHARS - 1] + "…"
