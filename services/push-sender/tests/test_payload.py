"""The payload always fits, says as much as it can, and the Topic stays legal."""

from __future__ import annotations

import json
import re

import pytest

from push_sender import payload

TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def build(body: str, title: str = "Carol mentioned you", url: str = "http://p/?post=1"):
    data = payload.build(title=title, body=body, url=url, notification_id=7)
    return data, json.loads(data)


def test_a_short_payload_is_left_as_it_is() -> None:
    data, fields = build("Have a look, @bob.")

    assert fields == {
        "title": "Carol mentioned you",
        "body": "Have a look, @bob.",
        "url": "http://p/?post=1",
        "notification_id": 7,
    }
    assert len(data) < 200


@pytest.mark.parametrize("unit", ["a", "é", "🚀", "\n", '"', "\\"])
def test_a_long_body_is_cut_to_the_largest_prefix_that_fits(unit: str) -> None:
    body = unit * 10_000

    data, fields = build(body)

    assert len(data) <= payload.MAX_PLAINTEXT
    assert fields["body"].endswith(payload.ELLIPSIS)
    assert body.startswith(fields["body"][:-1])
    assert fields["title"] == "Carol mentioned you"
    # One more character would not have fitted.
    longer = {**fields, "body": body[: len(fields["body"])] + payload.ELLIPSIS}
    assert len(payload.encode(longer)) > payload.MAX_PLAINTEXT


def test_the_limit_can_be_lowered_after_a_413() -> None:
    data = payload.build(
        title="t", body="x" * 3000, url="u", notification_id=1, limit=1024
    )

    assert len(data) <= 1024
    assert len(data) > 1000


def test_a_huge_title_is_shortened_once_the_body_is_gone() -> None:
    data, fields = build("body", title="T" * 9000)

    assert len(data) <= payload.MAX_PLAINTEXT
    assert fields["body"] == ""
    assert fields["title"].startswith("TTT") and fields["title"].endswith("…")
    assert fields["url"] == "http://p/?post=1"


def test_a_url_that_cannot_fit_is_dropped_rather_than_cut() -> None:
    data, fields = build("body", url="http://p/?" + "q" * 9000)

    assert len(data) <= payload.MAX_PLAINTEXT
    assert fields["url"] == ""
    assert fields["notification_id"] == 7


def test_the_plaintext_limit_leaves_room_for_one_aes128gcm_record() -> None:
    assert payload.MAX_PLAINTEXT + 86 + 1 + 16 == 4096


@pytest.mark.parametrize(
    ("post_id", "expected"),
    [(42, "post-42"), ("42", "post-42"), (10**20, "post-100000000000000000000")],
)
def test_the_topic_names_the_thread(post_id: object, expected: str) -> None:
    assert payload.topic(post_id) == expected


@pytest.mark.parametrize(
    "post_id", [10**40, "a thread/with spaces", "ünïcode", "x" * 100]
)
def test_a_thread_key_that_does_not_fit_is_hashed_into_a_legal_topic(
    post_id: object,
) -> None:
    topic = payload.topic(post_id)

    assert topic is not None and TOPIC.match(topic)
    assert topic == payload.topic(post_id)
    assert topic != payload.topic(f"{post_id}x")


def test_no_thread_means_no_topic() -> None:
    assert payload.topic(None) is None
    assert payload.topic("") is None


@pytest.mark.parametrize(
    ("priority", "urgency"),
    [(9, "high"), (7, "high"), (6, "normal"), (4, "normal"), (3, "low"), (0, "low")],
)
def test_urgency_follows_priority(priority: int, urgency: str) -> None:
    assert payload.urgency(priority) == urgency
