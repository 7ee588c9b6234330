"""What goes on the wire: each SSE event encoded once, however many streams get it.

A notification is encoded when the listener receives it and the same bytes are
written to every connection of its user; only replayed rows are encoded per stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sse_starlette import ServerSentEvent


@dataclass(frozen=True, slots=True)
class Note:
    """A notification ready to write: its place in the user's sequence, its bytes."""

    seq: int
    body: bytes


def _json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def notification(data: dict[str, Any]) -> Note:
    # The notification id is the SSE id: a browser sends it back as Last-Event-ID.
    event = ServerSentEvent(_json(data), event="notification", id=str(data["id"]))
    return Note(seq=data["seq"], body=event.encode())


def named(kind: str, data: dict[str, Any]) -> bytes:
    return ServerSentEvent(_json(data), event=kind).encode()


def connected(retry_ms: int) -> bytes:
    return ServerSentEvent(comment="connected", retry=retry_ms).encode()


PING = ServerSentEvent(comment="ping").encode()
