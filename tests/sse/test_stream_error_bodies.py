"""The stream's refusals are written like every other route's errors.

``/sse`` answers ahead of FastAPI's routing, so it writes its errors itself; a
client comparing or logging the bodies sees the same compact JSON either way.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import asyncpg
import httpx
import pytest

from contracts.settings import Settings
from tests.sse.conftest import StartGateway
from tests.support.data import Demo
from tests.support.sse import SSEClient

pytestmark = pytest.mark.integration


def compact(found: object) -> bytes:
    return json.dumps(found, separators=(",", ":"), ensure_ascii=False).encode()


async def test_a_refused_token_gets_the_same_body_from_the_stream_as_elsewhere(
    start_gateway: StartGateway, demo: Demo
) -> None:
    gateway = start_gateway()
    bad = {"Authorization": "Bearer not-a-token"}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        stream = await client.get("/sse", headers=bad)
        inbox = await client.get("/inbox", headers=bad)

    assert [stream.status_code, inbox.status_code] == [401, 401]
    assert stream.content == inbox.content
    assert stream.content == compact(stream.json())
    assert stream.headers["content-type"] == inbox.headers["content-type"]
    assert stream.headers["www-authenticate"] == "Bearer"


async def test_a_stream_over_the_limit_is_refused_in_compact_json(
    start_gateway: StartGateway, demo: Demo, token: Callable[..., str]
) -> None:
    gateway = start_gateway(NOTIFLOW_SSE_MAX_STREAMS_PER_USER="1")
    url = f"{gateway.url}/sse?token={token(demo.bob)}"
    async with SSEClient(url) as held, SSEClient(url) as refused:
        pass

    assert held.status == 200
    assert refused.status == 429
    found = json.loads(refused.body)
    assert found["error"] == "too_many_streams"
    assert refused.body == compact(found)


@pytest.mark.parametrize("table", ["users", "inbox_sequences"])
async def test_a_stream_meeting_a_missing_table_is_refused_503_as_elsewhere(
    start_gateway: StartGateway,
    demo: Demo,
    token: Callable[..., str],
    settings: Settings,
    table: str,
) -> None:
    gateway = start_gateway()
    bob = {"Authorization": f"Bearer {token(demo.bob)}"}
    db = await asyncpg.connect(settings.database_url)
    try:
        await db.execute(f"ALTER TABLE {table} RENAME TO {table}_away")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            opened = await client.get("/sse", headers=bob)
            probed = await client.head("/sse", headers=bob)
        await db.execute(f"ALTER TABLE {table}_away RENAME TO {table}")
    finally:
        await db.close()

    assert opened.status_code == 503, opened.text
    assert opened.json()["error"] == "unavailable"
    assert opened.headers["retry-after"] == "2"
    if table == "users":
        assert probed.status_code == 503
