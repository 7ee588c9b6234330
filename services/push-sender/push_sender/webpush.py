"""One push to one device, and what the push service's answer means.

Outcomes, after RFC 8030 and what the big push services answer::

    sent        2xx: the push service holds the message for the device
    gone        404, 410: the subscription is dead; delete it, never retry (also a
                subscription past its expirationTime, which is not pushed to)
    too_large   413: the caller shortens the payload and sends once more
    retry       429, 5xx, timeouts, refused or dropped connections: try later,
                no sooner than the service's Retry-After
    rejected    any other answer (400, 401, 403…): the request itself is wrong and
                repeating it changes nothing; also an endpoint whose host now
                resolves to a non-public address, which is never connected to

Encryption (ECDH + HKDF + AES-GCM over a few hundred bytes) takes well under a
millisecond, so it runs inline. The request goes out on a shared
``httpx.AsyncClient`` rather than through pywebpush's ``requests`` session: a
thread per request would be the only way to keep that off the event loop, and it
could not be cancelled when the service drains.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal

import http_ece
import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from push_sender.endpoints import UnsafeAddress
from push_sender.vapid import VapidKeys, b64url_decode

Outcome = Literal["sent", "gone", "too_large", "retry", "rejected"]

# A Retry-After beyond this is treated as this: the row must come back some day.
MAX_RETRY_AFTER = 24 * 3600.0
# The most of a push service's answer read, for the detail of a failure.
MAX_BODY_BYTES = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
# delta-seconds: ASCII digits only (str.isdigit also takes "²" and "٣").
_SECONDS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Subscription:
    id: int
    endpoint: str
    p256dh: str
    auth: str
    # When the browser said it expires; None when it did not say.
    expires_at: datetime | None = None


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    status: int | None
    detail: str
    retry_after: float | None = None


@dataclass(frozen=True)
class Push:
    """What goes to every device of one notification."""

    payload: bytes
    ttl: int
    urgency: str
    topic: str | None


def encrypt(plaintext: bytes, p256dh: str, auth: str) -> bytes:
    """RFC 8291 ``aes128gcm`` for the browser that owns ``p256dh``/``auth``."""
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    return http_ece.encrypt(
        plaintext,
        salt=os.urandom(16),
        private_key=ephemeral,
        dh=b64url_decode(p256dh),
        auth_secret=b64url_decode(auth),
        version="aes128gcm",
    )


def headers(push: Push, vapid: VapidKeys, endpoint: str) -> dict[str, str]:
    found = {
        "Authorization": vapid.authorization(endpoint),
        "Content-Encoding": "aes128gcm",
        "Content-Type": "application/octet-stream",
        "TTL": str(push.ttl),
        "Urgency": push.urgency,
    }
    if push.topic:
        found["Topic"] = push.topic
    return found


async def send(
    client: httpx.AsyncClient,
    subscription: Subscription,
    push: Push,
    vapid: VapidKeys,
    deadline: float,
) -> Result:
    """Push once; ``deadline`` bounds the whole exchange, not each phase of it."""
    body = encrypt(push.payload, subscription.p256dh, subscription.auth)
    try:
        async with (
            asyncio.timeout(deadline),
            client.stream(
                "POST",
                subscription.endpoint,
                content=body,
                headers=headers(push, vapid, subscription.endpoint),
            ) as response,
        ):
            text = await _beginning(response)
    except UnsafeAddress as exc:
        return Result("rejected", None, f"endpoint {exc}")
    except (TimeoutError, httpx.TimeoutException):
        return Result("retry", None, f"no answer within {deadline:g}s")
    except httpx.HTTPError as exc:
        return Result("retry", None, f"request failed: {exc!r}")
    return classify(response, text)


async def _beginning(response: httpx.Response) -> str:
    """The start of ``response``'s body as text, for a failure's detail.

    The endpoint is the subscriber's to choose, and so is what answers there:
    the body is read only as far as :data:`MAX_BODY_BYTES`, never decompressed (a
    few kilobytes of gzip can hold gigabytes), and the rest left unread.
    """
    if 200 <= response.status_code < 300:
        # Taken: what follows, however slow, changes nothing.
        return ""
    read = bytearray()
    async for chunk in response.aiter_raw():
        read += chunk
        if len(read) >= MAX_BODY_BYTES:
            break
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        return ""
    return read[:MAX_BODY_BYTES].decode("utf-8", "replace")


def classify(response: httpx.Response, text: str | None = None) -> Result:
    """What ``response`` means; ``text`` is the start of its body, when read."""
    status = response.status_code
    if text is None:
        text = response.text
    # Control characters are no part of a detail (and PostgreSQL stores no NUL).
    detail = f"HTTP {status} {_CONTROL.sub(' ', text[:200]).strip()}".strip()
    if 200 <= status < 300:
        return Result("sent", status, f"HTTP {status}")
    if status in (404, 410):
        return Result("gone", status, detail)
    if status == 413:
        return Result("too_large", status, detail)
    if status == 429 or status >= 500:
        after = retry_after(response.headers.get("Retry-After"))
        return Result("retry", status, detail, after)
    return Result("rejected", status, detail)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` of either form; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return min(max(0.0, (when - current).total_seconds()), MAX_RETRY_AFTER)
