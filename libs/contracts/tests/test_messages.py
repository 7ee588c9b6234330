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
            b'{"a":' * 5000 + b"1" + b"}" * 5000,
            "body nests arrays or objects too deeply",
        ),
        (
            b'{"comment_id": ' + b"7" * 5000 + b"}",
            "body has a number of more than 4300 digits, more than any field takes",
        ),
        (b"\xff\xfe\x00", "body is not valid UTF-8: byte 0xff at offset 0"),
        (b'{"body": "caf\xe9"}', "body is not valid UTF-8: byte 0xe9 at offset 13"),
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

    parts, enveloped = decode_items(DeliveryRequested, batch.to_bytes(), DeliveryBatch)

    assert enveloped
    assert [p.message for p in parts] == list(batch.deliveries)
    assert [p.problem for p in parts] == [None, None, None]
    # Each part can travel alone as the DeliveryRequested it is.
    assert [decode(DeliveryRequested, p.body) for p in parts] == list(batch.deliveries)


def test_a_single_delivery_reads_the_same_with_or_without_an_envelope() -> None:
    single = delivery(9)

    for envelope in (DeliveryBatch, None):
        parts, enveloped = decode_items(DeliveryRequested, single.to_bytes(), envelope)
        assert not enveloped
        assert [(p.message, p.problem, p.body) for p in parts] == [
            (single, None, single.to_bytes())
        ]


@pytest.mark.parametrize("count", [0, MAX_BATCH_DELIVERIES + 1])
def test_a_delivery_batch_must_hold_a_bounded_number_of_deliveries(
    count: int,
) -> None:
    body = json.dumps(
        {
            "schema_version": "1.0",
            "deliveries": [
                json.loads(delivery(n).to_bytes()) for n in range(1, count + 1)
            ],
        }
    ).encode()

    with pytest.raises(BadMessage, match="field 'deliveries' must be a list of 1 to"):
        decode_items(DeliveryRequested, body, DeliveryBatch)


@pytest.mark.parametrize(
    ("items", "named"),
    [
        (None, "null"),
        ({}, "an object"),
        ("x", "a string"),
        (3, "a number"),
        ([], "0 items"),
    ],
)
def test_a_delivery_batch_without_a_list_of_deliveries_says_what_it_held(
    items: object, named: str
) -> None:
    body = json.dumps({"schema_version": "1.0", "deliveries": items}).encode()

    with pytest.raises(BadMessage) as caught:
        decode_items(DeliveryRequested, body, DeliveryBatch)
    assert caught.value.reason.endswith(
        f"must be a list of 1 to {MAX_BATCH_DELIVERIES} items, got {named}"
    )


def test_a_bad_item_in_a_delivery_batch_spoils_only_itself() -> None:
    good, later = json.loads(delivery(1).to_bytes()), json.loads(delivery(3).to_bytes())
    items = [good, {"schema_version": "1.0", "notification_id": "nope"}, 7, later]
    body = json.dumps({"schema_version": "1.0", "deliveries": items}).encode()

    parts, _ = decode_items(DeliveryRequested, body, DeliveryBatch)

    assert [p.message.notification_id if p.message else None for p in parts] == [
        1,
        None,
        None,
        3,
    ]
    assert parts[1].problem is not None
    assert "item 1 of DeliveryBatch" in parts[1].problem.reason
    assert "field 'notification_id'" in parts[1].problem.reason
    assert parts[2].problem is not None
    assert "must be a JSON object" in parts[2].problem.reason
    assert json.loads(parts[1].body) == items[1]


def test_an_item_of_another_major_version_is_refused_alone() -> None:
    odd = {**json.loads(delivery(2).to_bytes()), "schema_version": "9.0"}
    items = [json.loads(delivery(1).to_bytes()), odd]
    body = json.dumps({"schema_version": "1.0", "deliveries": items}).encode()

    parts, _ = decode_items(DeliveryRequested, body, DeliveryBatch)

    assert parts[0].problem is None
    assert parts[1].problem is not None
    assert "unsupported schema_version '9.0'" in parts[1].problem.reason


def test_a_schema_version_that_is_not_a_string_is_named_as_such() -> None:
    with pytest.raises(BadMessage, match="'schema_version' must be a string"):
        decode(CommentCreated, json.dumps(event(schema_version=1.0)).encode())


@pytest.mark.parametrize("bad", [-1, 2**63])
def test_ids_no_row_can_have_are_refused(bad: int) -> None:
    body = json.dumps({**json.loads(delivery(1).to_bytes()), "user_id": bad}).encode()

    with pytest.raises(BadMessage, match="field 'user_id'"):
        decode(DeliveryRequested, body)


def test_a_consumer_without_the_envelope_refuses_a_batch_with_a_reason() -> None:
    batch = DeliveryBatch(deliveries=[delivery(1)])

    with pytest.raises(BadMessage, match="invalid DeliveryRequested"):
        decode(DeliveryRequested, batch.to_bytes())
