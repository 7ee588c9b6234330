"""Microseconds to build one notification email, the old way and the current one.

``old`` is the message built from the standard library's MIME classes and flattened
through the same header policy, as the email sender did before it wrote the bytes
itself; the tests keep that construction as their reference and this script borrows
it from them. ``new`` is :func:`email_sender.mime.build` with the same recipient
and subject every time, as a digest or a busy thread sends them, and ``new, cold``
with its caches emptied before every message: a recipient and subject never seen.

    uv run --no-sync python bench/mime_build.py
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from email_sender import mime

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "services" / "email-sender" / "tests" / "test_mime_building.py"

MESSAGE: dict[str, Any] = {
    "notification_id": 123456,
    "to_address": "carol.smith@example.com",
    "to_name": "Carol Smith",
    "subject": "Alice mentioned you on “Quarterly planning”",
    "text": (
        "Alice mentioned you in a comment on Quarterly planning: could you take "
        "a look at the budget numbers before Friday? Reply on the thread to answer."
    ),
    "html": (
        '<p><b>Alice</b> mentioned you in a comment on <a href="https://app.'
        'example.com/t/42">Quarterly planning</a>: could you take a look at the '
        "budget numbers before Friday?</p>"
    ),
    "sender": "notifications@notiflow.example.com",
    "sender_name": "notiflow",
    "domain": "notiflow.example.com",
    "extra_headers": {"List-Unsubscribe": "<https://app.example.com/unsub?u=42>"},
}


def _reference() -> Callable[..., bytes]:
    spec = importlib.util.spec_from_file_location("mime_reference", TESTS)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_build  # type: ignore[no-any-return]


def _cold(**options: Any) -> mime.Mail:
    for cached in (mime.recipient, mime._address_header, mime._encoded_header):
        cached.cache_clear()
    return mime.build(**options)


def microseconds(build: Callable[..., object], runs: int) -> float:
    """The best of five rounds, so that other work on the machine counts least."""
    for _ in range(runs // 10):
        build(**MESSAGE)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(runs):
            build(**MESSAGE)
        best = min(best, (time.perf_counter() - started) / runs)
    return best * 1e6


def main() -> None:
    reference = _reference()

    def old(**options: Any) -> bytes:
        return reference(**options, policy=mime._WIRE)

    for label, build, runs in [
        ("old", old, 1000),
        ("new", mime.build, 10000),
        ("new, cold", _cold, 1000),
    ]:
        print(f"{label:<10} {microseconds(build, runs):7.1f} µs per message")


if __name__ == "__main__":
    main()
