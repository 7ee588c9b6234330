"""Versioned message schemas.

Every message body is a JSON object carrying ``schema_version`` ("MAJOR.MINOR").
Within one major version producers only add optional fields, so consumers ignore
fields they do not know; a different major version is refused with
:class:`BadMessage`, which consumers turn into a dead letter carrying the reason.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, ClassVar, Generic, Literal, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ChannelType = Literal["email", "sse", "push"]


class BadMessage(Exception):
    """A message that can never be processed; dead-letter it with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    MAJOR: ClassVar[int] = 1
    MINOR: ClassVar[int] = 0
    schema_version: str = ""

    def model_post_init(self, _context: Any) -> None:
        if not self.schema_version:
            object.__setattr__(self, "schema_version", f"{self.MAJOR}.{self.MINOR}")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class CommentCreated(Message):
    """A comment was stored; published by the comments service."""

    event_id: UUID
    occurred_at: datetime
    comment_id: int
    post_id: int
    author_id: int
    body: str


class DeliveryRequested(Message):
    """One notification row is ready for its channel type's sender.

    The row in PostgreSQL is the truth; the message only says which row to claim.
    """

    notification_id: int
    event_id: UUID
    user_id: int
    type: ChannelType
    channel: str
    priority: int = Field(ge=0, le=9)
    event_occurred_at: datetime


M = TypeVar("M", bound=Message)

# Rows a DeliveryBatch may carry; a comment in a busy thread is split into several.
MAX_BATCH_DELIVERIES = 500


class Envelope(Message, Generic[M]):
    """A message carrying several messages of one model, each handled on its own.

    ``ITEMS`` names the field that holds them. A consumer that reads an envelope
    handles, retries and dead-letters every item separately; an item that fails is
    sent on as a message of its own.
    """

    ITEMS: ClassVar[str]


class DeliveryBatch(Envelope[DeliveryRequested]):
    """Several rows of one channel type and priority, for that type's sender.

    One message per (event, type, priority) instead of one per row: a comment that
    reaches many people costs the broker a few messages, not one per recipient.
    """

    ITEMS: ClassVar[str] = "deliveries"
    deliveries: list[DeliveryRequested] = Field(
        min_length=1, max_length=MAX_BATCH_DELIVERIES
    )


def decode(model: type[M], body: bytes) -> M:
    """Parse ``body`` as ``model``; raise :class:`BadMessage` naming what is wrong."""
    return _validate(model, _parse(body))


def decode_items(
    model: type[M], body: bytes, envelope: type[Envelope[M]] | None = None
) -> tuple[list[M], bool]:
    """The ``model`` messages in ``body``, and whether an ``envelope`` held them."""
    data = _parse(body)
    if envelope is not None and envelope.ITEMS in data:
        return list(getattr(_validate(envelope, data), envelope.ITEMS)), True
    return [_validate(model, data)], False


def _parse(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadMessage(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadMessage(f"body must be a JSON object, got {type(data).__name__}")
    return data


def _validate(model: type[M], data: dict[str, Any]) -> M:
    version = data.get("schema_version")
    if not isinstance(version, str) or not version:
        raise BadMessage("field 'schema_version' is missing")
    major, _, _ = version.partition(".")
    if major != str(model.MAJOR):
        raise BadMessage(
            f"unsupported schema_version {version!r} for {model.__name__}; "
            f"this consumer reads major version {model.MAJOR}"
        )

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc'])}': {err['msg']}"
            for err in exc.errors()
        )
        raise BadMessage(f"invalid {model.__name__}: {problems}") from None
