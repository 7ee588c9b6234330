from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from contracts.messages import (
    MAX_BATCH_DELIVERIES,
    BadMessage,
    CommentCreated,
    DeliveryBatch,
    DeliveryRequested,
    decode,
    decode_items,
)


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


def delivery(notification_id: int) -> DeliveryRequested:
    return DeliveryRequested(
        notification_id=notification_id,
        event_id=uuid.uuid4(),
        user_id=7,
        type="email",
        channel="comment.reply",
        priority=5,
        event_occurred_at=datetime.now(UTC),
    )


def test_a_delivery_batch_yields_its_deliveries_in_order() -> None:
    batch = DeliveryBatch(deliveries=[delivery(3), delivery(1), delivery(2)])

    items, enveloped = decode_items(DeliveryRequested, batch.to_bytes(), DeliveryBatch)

    assert enveloped
    assert [i.notification_id for i in items] == [3, 1, 2]
    assert items == list(batch.deliveries)


def test_a_single_delivery_reads_the_same_with_or_without_an_envelope() -> None:
    single = delivery(9)

    assert decode_items(DeliveryRequested, single.to_bytes(), DeliveryBatch) == (
        [single],
        False,
    )
    assert decode_items(DeliveryRequested, single.to_bytes()) == ([single], False)


@pytest.mark.parametrize(
    ("count", "problem"), [(0, "at least 1"), (MAX_BATCH_DELIVERIES + 1, "at most")]
)
def test_a_delivery_batch_must_hold_a_bounded_number_of_deliveries(
    count: int, problem: str
) -> None:
    body = json.dumps(
        {
            "schema_version": "1.0",
            "deliveries": [
                json.loads(delivery(n).to_bytes()) for n in range(1, count + 1)
            ],
        }
    ).encode()

    with pytest.raises(BadMessage, match=f"field 'deliveries'.*{problem}"):
        decode_items(DeliveryRequested, body, DeliveryBatch)


def test_a_bad_item_in_a_delivery_batch_is_named() -> None:
    items = [json.loads(delivery(1).to_bytes()), {"schema_version": "1.0"}]
    body = json.dumps({"schema_version": "1.0", "deliveries": items}).encode()

    with pytest.raises(BadMessage, match=r"field 'deliveries\.1\.notification_id'"):
        decode_items(DeliveryRequested, body, DeliveryBatch)


def test_a_consumer_without_the_envelope_refuses_a_batch_with_a_reason() -> None:
    batch = DeliveryBatch(deliveries=[delivery(1)])

    with pytest.raises(BadMessage, match="invalid DeliveryRequested"):
        decode(DeliveryRequested, batch.to_bytes())
