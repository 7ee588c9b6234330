"""What a push service's answer means, and how long Retry-After asks to wait."""

from __future__ import annotations

import httpx
import pytest

from push_sender import webpush


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (201, "sent"),
        (202, "sent"),
        (404, "gone"),
        (410, "gone"),
        (413, "too_large"),
        (429, "retry"),
        (500, "retry"),
        (503, "retry"),
        (400, "rejected"),
        (401, "rejected"),
        (403, "rejected"),
    ],
)
def test_answers_are_sorted(status: int, outcome: str) -> None:
    assert webpush.classify(httpx.Response(status)).outcome == outcome


def test_retry_after_in_seconds_or_as_a_date() -> None:
    now = 1_700_000_000.0

    assert webpush.retry_after("120", now) == 120
    assert webpush.retry_after("Tue, 14 Nov 2023 22:15:20 GMT", now) == 120
    assert webpush.retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now) == 0
    assert webpush.retry_after("soon", now) is None
    assert webpush.retry_after(None, now) is None
    assert webpush.retry_after("99999999", now) == webpush.MAX_RETRY_AFTER


def test_a_429_carries_its_retry_after() -> None:
    answer = httpx.Response(429, headers={"Retry-After": "7"}, text="slow down")

    result = webpush.classify(answer)

    assert result.retry_after == 7 and result.status == 429
    assert "slow down" in result.detail
