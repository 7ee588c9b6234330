"""Who gets a stream: which Last-Event-IDs count, how many streams, the refusals."""

from __future__ import annotations

import json

import pytest
from starlette.types import Message

from contracts.auth import issue_token
from contracts.settings import Settings
from sse_gateway.hub import Connection, Hub
from sse_gateway.stream import StreamEndpoint, notification_id_of


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("1", 1),
        ("42", 42),
        (str(2**63 - 1), 2**63 - 1),
        (str(2**63), None),
        ("9" * 5000, None),
        ("0", None),
        ("-1", None),
        ("+1", None),
        ("1.0", None),
        ("²", None),  # isdigit() says yes, int() says no
        ("١٢", None),  # Arabic-Indic digits, which int() would read as 12
        ("", None),
        (None, None),
    ],
)
def test_only_a_decimal_bigint_names_a_notification(
    header: str | None, expected: int | None
) -> None:
    assert notification_id_of(header) == expected


def test_a_user_joins_only_up_to_the_limit_and_a_leaver_frees_a_place() -> None:
    hub = Hub()
    bobs = [Connection(2) for _ in range(3)]

    joined = [hub.admit(conn, 2) for conn in bobs]
    alice_joined = hub.admit(Connection(1), 2)
    hub.remove(bobs[0])
    rejoined = hub.admit(bobs[2], 2)

    assert joined == [True, True, False]
    assert alice_joined
    assert rejoined
    assert hub.connections == 3


async def test_an_unexpected_failure_before_streaming_is_still_a_json_error() -> None:
    settings = Settings(env="test")
    token = issue_token(1, "bob", settings)
    endpoint = StreamEndpoint(
        settings,
        Hub(),
        lambda: BrokenPool(),  # type: ignore[arg-type, return-value]
        heartbeat_seconds=15,
        retry_ms=3000,
        send_timeout=30,
        lean=True,
        origins=frozenset(),
        max_streams=20,
    )
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/sse",
        "query_string": f"token={token}".encode(),
        "headers": [],
    }
    await endpoint(scope, _never, send)

    start, body = sent
    assert start["status"] == 500
    assert (b"content-type", b"application/json") in start["headers"]
    assert set(json.loads(body["body"])) == {"error", "detail"}


class BrokenPool:
    async def acquire(self, timeout: float) -> None:
        raise RuntimeError("a bug, not an outage")


async def _never() -> Message:
    raise AssertionError("the endpoint should not read the request")
