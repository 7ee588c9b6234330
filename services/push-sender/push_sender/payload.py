"""What a push carries, and the headers that steer it through the push service.

A push service accepts at most 4096 bytes of encrypted body. An aes128gcm body is
one record: a 86-byte header (salt, record size, key id = our 65-byte ephemeral
public key), the plaintext, one delimiter byte and a 16-byte tag, so the JSON may
use 3993 bytes. A payload over that is shortened, body first, and never refused:
a notification that says less beats one that never arrives.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

RECORD_OVERHEAD = 16 + 4 + 1 + 65 + 1 + 16  # salt, rs, idlen, keyid, delimiter, tag
MAX_BODY = 4096
MAX_PLAINTEXT = MAX_BODY - RECORD_OVERHEAD
# After a 413 the next try sends this much at most; some services (and proxies in
# front of them) take less than the standard asks for.
FALLBACK_PLAINTEXT = 1024
ELLIPSIS = "…"

MAX_TOPIC = 32
_TOPIC_CHARS = re.compile(r"^[A-Za-z0-9_-]+$")


def encode(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()


def build(
    *,
    title: str,
    body: str,
    url: str,
    notification_id: int,
    limit: int = MAX_PLAINTEXT,
) -> bytes:
    """The JSON payload, at most ``limit`` bytes, shortening the text to fit."""
    fields: dict[str, Any] = {
        "title": title,
        "body": body,
        "url": url,
        "notification_id": notification_id,
    }
    data = encode(fields)
    if len(data) <= limit:
        return data

    # Body first, then title; a URL that alone overflows is dropped, since half a
    # URL opens the wrong page.
    for key in ("body", "title"):
        fields[key] = _fit(fields, key, limit)
        data = encode(fields)
        if len(data) <= limit:
            return data
    fields["url"] = ""
    fields["title"] = _fit(fields, "title", limit)
    return encode(fields)


def _fit(fields: dict[str, Any], key: str, limit: int) -> str:
    """The longest prefix of ``fields[key]`` (plus an ellipsis) that fits."""
    text: str = fields[key]
    lo, hi = 0, len(text)
    best = ""
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = text[:mid] + ELLIPSIS if mid < len(text) else text
        if len(encode({**fields, key: candidate})) <= limit:
            best, lo = candidate, mid + 1
        else:
            hi = mid - 1
    return best


def topic(post_id: object) -> str | None:
    """The ``Topic`` header for a thread: a newer push replaces an older one.

    RFC 8030 allows at most 32 characters of the URL-safe base64 alphabet. A thread
    key that does not fit as it is gets hashed, so distinct threads stay distinct.
    """
    if post_id is None or post_id == "":
        return None
    plain = f"post-{post_id}"
    if len(plain) <= MAX_TOPIC and _TOPIC_CHARS.match(plain):
        return plain
    digest = hashlib.sha256(plain.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()[:MAX_TOPIC]


def urgency(priority: int) -> str:
    """RFC 8030 ``Urgency`` from the channel priority (0-9)."""
    if priority >= 7:
        return "high"
    if priority >= 4:
        return "normal"
    return "low"
