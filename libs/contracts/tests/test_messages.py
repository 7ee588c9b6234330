from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from contracts.messages import BadMessage, CommentCreated, decode


def event(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "schema_version": "1.0",
        "event_id": str(uuid.uuid4()),
        "occurred_at": datetime.now(UTC).isoformat(),
        "comment_id": 1,
        "post_id": 2,
        "author_id": 3,
        "body": "hello",
    }
    data.update(overrides)
    return data


def test_round_trip_keeps_every_field() -> None:
    original = CommentCreated.model_validate(event())

    assert decode(CommentCreated, original.to_bytes()) == original


def test_a_newer_minor_version_with_extra_fields_is_accepted() -> None:
    decoded = decode(
        CommentCreated, json.dumps(event(schema_version="1.7", x=1)).encode()
    )

    assert decoded.comment_id == 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (
            json.dumps(event(schema_version="2.0")).encode(),
            "unsupported schema_version '2.0'",
        ),
        (
            json.dumps(
                {k: v for k, v in event().items() if k != "schema_version"}
            ).encode(),
            "'schema_version' is missing",
        ),
        (
            json.dumps({k: v for k, v in event().items() if k != "post_id"}).encode(),
            "field 'post_id'",
        ),
        (json.dumps(event(comment_id="abc")).encode(), "field 'comment_id'"),
    ],
)
def test_bad_messages_say_what_is_wrong(body: bytes, reason: str) -> None:
    with pytest.raises(BadMessage, match=reason.replace("(", r"\(")) as info:
        decode(CommentCreated, body)

    assert reason in info.value.reason
