"""What a push service's answer means, and how long Retry-After asks to wait."""

from __future__ import annotations

import gzip
import os
from collections.abc import AsyncIterator

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from push_sender import webpush
from push_sender.vapid import VapidKeys, b64url, public_point


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


class _Counted(httpx.AsyncByteStream):
    """A body sent 1 KiB a chunk, noting how many chunks were read."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.body), 1024):
            self.read += 1
            yield self.body[start : start + 1024]


def _device() -> webpush.Subscription:
    browser = ec.generate_private_key(ec.SECP256R1())
    return webpush.Subscription(
        id=1,
        endpoint="https://push.example.net/device",
        p256dh=b64url(public_point(browser.public_key())),
        auth=b64url(os.urandom(16)),
    )


async def _answered(response: httpx.Response) -> webpush.Result:
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda _: response))
    async with client:
        return await webpush.send(
            client,
            _device(),
            webpush.Push(payload=b"{}", ttl=60, urgency="normal", topic=None),
            VapidKeys(ec.generate_private_key(ec.SECP256R1()), "mailto:o@example.com"),
            deadline=5,
        )


async def test_only_the_start_of_a_push_services_answer_is_read() -> None:
    body = _Counted(b"x" * 100_000_000)

    result = await _answered(httpx.Response(500, stream=body))

    assert result.outcome == "retry"
    assert result.detail == "HTTP 500 " + "x" * 200
    assert body.read == 1


async def test_a_compressed_answer_is_not_unpacked() -> None:
    bomb = _Counted(gzip.compress(b"\0" * 50_000_000))  # about 49 KiB
    headers = {"Content-Encoding": "gzip"}

    result = await _answered(httpx.Response(503, headers=headers, stream=bomb))

    assert result.outcome == "retry"
    assert result.detail == "HTTP 503"
    assert bomb.read == 1
