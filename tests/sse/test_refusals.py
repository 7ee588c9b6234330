"""What the gateway answers to requests it cannot serve: JSON errors, never a 500.

Ids beyond PostgreSQL's bigint, tokens for users who do not exist, and more
streams than one user may hold are all ordinary refusals with an ``error`` code,
a ``detail`` and, where it helps, a header saying what to do next.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest

from contracts.auth import ALGORITHM, AUDIENCE, issue_token
from contracts.settings import Settings
from tests.sse import helpers
from tests.sse.conftest import StartGateway
from tests.support.data import Demo
from tests.support.processes import Service
from tests.support.sse import SSEClient
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

BEYOND_BIGINT = str(2**63)


def assert_json_error(answer: httpx.Response | SSEClient, code: str) -> Any:
    if isinstance(answer, SSEClient):
        headers, body = answer.response_headers, answer.body
    else:
        headers, body = answer.headers, answer.content
    assert headers is not None and headers["content-type"] == "application/json"
    found = json.loads(body)
    assert found["error"] == code and found["detail"], found
    return found


def signed(settings: Settings, **claims: object) -> str:
    """A token signed with the real secret, with whatever claims the test needs."""
    base = {"sub": "1", "aud": AUDIENCE, "exp": int(time.time()) + 300}
    return jwt.encode({**base, **claims}, settings.secret_key, algorithm=ALGORITHM)


@pytest.mark.parametrize(
    ("method", "path", "params", "field"),
    [
        ("GET", "/inbox", {"cursor": BEYOND_BIGINT}, "cursor"),
        ("GET", "/inbox", {"cursor": "9" * 5000}, "cursor"),
        ("POST", f"/inbox/{BEYOND_BIGINT}/read", {}, "notification_id"),
        ("POST", f"/inbox/{BEYOND_BIGINT}/archive", {}, "notification_id"),
        ("POST", f"/inbox/{'9' * 5000}/read", {}, "notification_id"),
        ("POST", "/inbox/0/archive", {}, "notification_id"),
    ],
)
async def test_inbox_ids_beyond_bigint_are_refused_naming_the_parameter(
    gateway: Service,
    demo: Demo,
    token: Callable[..., str],
    method: str,
    path: str,
    params: dict[str, str],
    field: str,
) -> None:
    bob = {"Authorization": f"Bearer {token(demo.bob)}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=bob) as client:
        answer = await client.request(method, path, params=params)

    assert answer.status_code == 422
    found = assert_json_error(answer, "invalid_request")
    assert [f["field"] for f in found["fields"]] == [field]
    assert "Traceback" not in gateway.log()


@pytest.mark.parametrize(
    "last_event_id",
    [BEYOND_BIGINT, "9" * 5000, "0", "-1", "1e3", "12abc"],
    ids=["beyond-bigint", "5000-digits", "zero", "negative", "float", "text"],
)
async def test_a_last_event_id_that_names_no_notification_starts_the_stream_live(
    settings: Settings,
    gateway: Service,
    demo: Demo,
    token: Callable[..., str],
    last_event_id: str,
) -> None:
    url = f"{gateway.url}/sse?token={token(demo.bob)}"
    async with helpers.database(settings.database_url) as pg:
        await helpers.add_and_deliver(pg, demo.bob, "before")
        async with SSEClient(url, headers={"Last-Event-ID": last_event_id}) as live:
            fresh = await helpers.add_and_deliver(pg, demo.bob, "after")
            await live.wait_for("notification")

    assert live.status == 200
    assert live.ids() == [fresh]
    assert "Traceback" not in gateway.log()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/sse"),
        ("HEAD", "/sse"),
        ("GET", "/inbox"),
        ("GET", "/inbox/unread-count"),
        ("POST", "/inbox/read-all"),
        ("POST", "/inbox/1/read"),
    ],
)
async def test_a_signed_token_for_a_user_who_does_not_exist_gets_401(
    settings: Settings, gateway: Service, demo: Demo, method: str, path: str
) -> None:
    ghost_id = max(demo.alice, demo.bob, demo.carol) + 1000
    ghost = issue_token(ghost_id, "ghost", settings)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
        header = await client.request(
            method, path, headers={"Authorization": f"Bearer {ghost}"}
        )
        query = await client.request(method, path, params={"token": ghost})

    assert [header.status_code, query.status_code] == [401, 401]
    assert header.headers["www-authenticate"] == "Bearer"
    if method != "HEAD":
        found = assert_json_error(header, "unauthorized")
        assert found["detail"] == (
            f"the token names user {ghost_id}, who does not exist"
        )


async def test_a_stream_asked_for_over_http_1_0_is_refused_naming_the_version(
    settings: Settings, gateway: Service, demo: Demo
) -> None:
    token = issue_token(demo.bob, "bob", settings)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(f"GET /sse?token={token} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"505"
    assert b"transfer-encoding" not in head.lower()
    found = json.loads(body)
    assert found["error"] == "http_version_not_supported"
    assert "HTTP/1.1" in found["detail"]


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "99999999999999999999999"},
        {"sub": BEYOND_BIGINT},
        {"sub": "-1"},
        {"sub": "0"},
        {"exp": 1e400},
    ],
    ids=["huge-sub", "sub-beyond-bigint", "negative-sub", "zero-sub", "infinite-exp"],
)
@pytest.mark.parametrize("path", ["/sse", "/inbox", "/inbox/unread-count"])
async def test_a_token_whose_claims_name_no_possible_user_gets_401(
    settings: Settings, gateway: Service, claims: dict[str, object], path: str
) -> None:
    forged = signed(settings, **claims)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
        answer = await client.get(path, headers={"Authorization": f"Bearer {forged}"})

    assert answer.status_code == 401, answer.text
    assert_json_error(answer, "unauthorized")


async def test_a_token_that_expires_beyond_any_float_still_opens_a_stream(
    settings: Settings, gateway: Service, demo: Demo
) -> None:
    lasting = signed(settings, sub=str(demo.bob), exp=10**400)
    async with SSEClient(f"{gateway.url}/sse?token={lasting}") as live:
        pass
    assert live.status == 200


async def test_a_user_holds_at_most_the_configured_number_of_streams(
    start_gateway: StartGateway, demo: Demo, token: Callable[..., str]
) -> None:
    front = "https://front.example"
    gateway = start_gateway(
        NOTIFLOW_SSE_MAX_STREAMS_PER_USER="3", NOTIFLOW_CORS_ORIGINS=front
    )
    url = f"{gateway.url}/sse?token={token(demo.bob)}"
    held = [SSEClient(url) for _ in range(3)]
    for live in held:
        await live.__aenter__()
    try:
        async with SSEClient(url) as refused:
            pass
        async with httpx.AsyncClient() as client:
            # A page whose EventSource was refused asks this way why; one on
            # another origin may read when to try again.
            probe = await client.head(url, headers={"Origin": front})
        async with SSEClient(f"{gateway.url}/sse?token={token(demo.alice)}") as alice:
            pass

        await held.pop().__aexit__(None, None, None)
        held.append(
            await eventually(
                lambda: _opens(url), what="a stream opening once one has closed"
            )
        )
        async with SSEClient(url) as refused_again:
            pass
    finally:
        for live in held:
            await live.__aexit__(None, None, None)

    assert refused.status == 429
    assert refused.response_headers is not None
    assert int(refused.response_headers["retry-after"]) > 0
    assert_json_error(refused, "too_many_streams")
    assert probe.status_code == 429
    assert int(probe.headers["retry-after"]) > 0
    assert probe.headers["access-control-allow-origin"] == front
    assert "retry-after" in probe.headers["access-control-expose-headers"].lower()
    assert alice.status == 200
    # The refused streams were never counted: exactly one slot came free.
    assert refused_again.status == 429


async def _opens(url: str) -> SSEClient | None:
    """A stream that opened, kept open for the caller, or None if refused."""
    live = SSEClient(url)
    await live.__aenter__()
    if live.status == 200:
        return live
    await live.__aexit__(None, None, None)
    return None


def test_the_stream_limit_setting_refuses_less_than_one() -> None:
    from pydantic import ValidationError

    from sse_gateway.app import GatewaySettings

    with pytest.raises(ValidationError, match="sse_max_streams_per_user"):
        GatewaySettings(sse_max_streams_per_user=0)
