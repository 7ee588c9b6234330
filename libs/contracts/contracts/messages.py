"""Versioned message schemas.

Every message body is a JSON object carrying ``schema_version`` ("MAJOR.MINOR").
Within one major version producers only add optional fields, so consumers ignore
fields they do not know; a different major version is refused with
:class:`BadMessage`, which consumers turn into a dead letter carrying the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contracts import jsonkeys

ChannelType = Literal["email", "sse", "push"]

# Row ids are PostgreSQL bigints: a message naming a larger one names no row.
RowId = Annotated[int, Field(ge=0, le=2**63 - 1)]


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
    comment_id: RowId
    post_id: RowId
    author_id: RowId
    body: str


class DeliveryRequested(Message):
    """One notification row is ready for its channel type's sender.

    The row in PostgreSQL is the truth; the message only says which row to claim.

    ``trace`` (since 1.1) is the W3C trace context of the row's event, for a
    delivery that travels in a :class:`DeliveryBatch` with other events' deliveries:
    the message's own headers can then carry no one event's trace.
    """

    MINOR: ClassVar[int] = 1

    notification_id: RowId
    event_id: UUID
    user_id: RowId
    type: ChannelType
    channel: str
    priority: int = Field(ge=0, le=9)
    event_occurred_at: datetime
    trace: dict[str, str] | None = None


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

    One message per type and priority for all the events a dispatcher handles
    together, instead of one per row: a comment that reaches many people, or a burst
    of comments, costs the broker a few messages, not one per recipient.
    """

    ITEMS: ClassVar[str] = "deliveries"
    deliveries: list[DeliveryRequested] = Field(
        min_length=1, max_length=MAX_BATCH_DELIVERIES
    )


def decode(model: type[M], body: bytes) -> M:
    """Parse ``body`` as ``model``; raise :class:`BadMessage` naming what is wrong."""
    return _validate(model, _parse(body))


@dataclass(frozen=True)
class Part(Generic[M]):
    """One message a body carries: decoded, or the reason it cannot be; and the
    bytes it would have as a message of its own."""

    message: M | None
    problem: BadMessage | None
    body: bytes


def decode_items(
    model: type[M], body: bytes, envelope: type[Envelope[M]] | None = None
) -> tuple[list[Part[M]], bool]:
    """The ``model`` messages in ``body``, and whether an ``envelope`` held them.

    A body that is not one ``model`` nor a well-formed envelope raises
    :class:`BadMessage`. Inside an envelope each item is decoded on its own, so a
    bad item is a :class:`Part` with a problem and does not spoil the others.
    """
    data = _parse(body)
    if envelope is None or envelope.ITEMS not in data:
        return [Part(_validate(model, data), None, body)], False

    _check_version(envelope, data)
    items = data[envelope.ITEMS]
    field = envelope.model_fields[envelope.ITEMS]
    lowest, highest = _length_bounds(field.metadata)
    if not isinstance(items, list) or not lowest <= len(items) <= highest:
        found = (
            f"{len(items)} items"
            if isinstance(items, list)
            else _JSON_TYPES.get(type(items), type(items).__name__)
        )
        raise BadMessage(
            f"invalid {envelope.__name__}: field '{envelope.ITEMS}' must be a list "
            f"of {lowest} to {highest} items, got {found}"
        )
    parts: list[Part[M]] = []
    for index, item in enumerate(items):
        own = json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
        try:
            if not isinstance(item, dict):
                raise BadMessage(
                    f"item must be a JSON object, got {type(item).__name__}"
                )
            parts.append(Part(_validate(model, item), None, own))
        except BadMessage as exc:
            reason = f"item {index} of {envelope.__name__}: {exc.reason}"
            parts.append(Part(None, BadMessage(reason), own))
    return parts, True


_JSON_TYPES = {
    type(None): "null",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    dict: "an object",
}


def _length_bounds(metadata: list[Any]) -> tuple[int, int]:
    lowest, highest = 0, 2**31
    for rule in metadata:
        lowest = getattr(rule, "min_length", None) or lowest
        highest = getattr(rule, "max_length", None) or highest
    return lowest, highest


def _parse(body: bytes) -> dict[str, Any]:
    # Messages travel as UTF-8 JSON. Decoding first keeps the parser from guessing
    # UTF-16 or UTF-32 from the first bytes and reporting its guess.
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        byte = body[exc.start : exc.start + 1].hex()
        raise BadMessage(
            f"body is not valid UTF-8: byte 0x{byte} at offset {exc.start}"
        ) from None
    try:
        data = json.loads(text)
    except (RecursionError, ValueError) as exc:
        beyond = jsonkeys.beyond_limits(exc)
        reason = f"body {beyond}" if beyond else f"body is not valid JSON: {exc}"
        raise BadMessage(reason) from None
    if not isinstance(data, dict):
        raise BadMessage(f"body must be a JSON object, got {type(data).__name__}")
    return data


def _check_version(model: type[Message], data: dict[str, Any]) -> None:
    version = data.get("schema_version")
    if version is None or version == "":
        raise BadMessage("field 'schema_version' is missing")
    if not isinstance(version, str):
        raise BadMessage(
            "field 'schema_version' must be a string such as \"1.0\", "
            f"got {type(version).__name__}"
        )
    major, _, _ = version.partition(".")
    if major != str(model.MAJOR):
        raise BadMessage(
            f"unsupported schema_version {version!r} for {model.__name__}; "
            f"this consumer reads major version {model.MAJOR}"
        )


def _validate(model: type[M], data: dict[str, Any]) -> M:
    _check_version(model, data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc'])}': {err['msg']}"
            for err in exc.errors()
        )
        raise BadMessage(f"invalid {model.__name__}: {problems}") from None
