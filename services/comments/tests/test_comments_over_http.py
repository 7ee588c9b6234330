"""The comments API served by uvicorn, for what only a real HTTP server shows: how
header values and bodies arrive once they have crossed the wire."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from comments.app import create_app
from contracts.auth import issue_token
from contracts.settings import Settings
from tests.support.data import Demo, seed_demo

pytestmark = pytest.mark.integration


@dataclass
class Served:
    app: FastAPI
    port: int
    token: str
    post: int


@pytest.fixture
async def served(
    settings: Settings, request: pytest.FixtureRequest
) -> AsyncIterator[Served]:
    """The comments app behind uvicorn on 127.0.0.1, in the test's event loop.

    The HTTP parser is uvicorn's choice (httptools, as the services run), unless a
    test names one through indirect parametrisation.
    """
    demo: Demo = await seed_demo(settings.database_url)
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    http = getattr(request, "param", "auto")
    config = uvicorn.Config(
        app, http=http, log_config=None, access_log=False, ws="none"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(15):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
        yield Served(
            app,
            sock.getsockname()[1],
            issue_token(demo.bob, "bob", settings),
            demo.post,
        )
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=15)
        sock.close()


async def post_raw(port: int, headers: bytes, body: bytes) -> tuple[int, Any]:
    """POST /comments written byte for byte; the status and the JSON answer."""
    status, _, content = await post_bytes(port, headers, body)
    return status, json.loads(content)


async def post_bytes(
    port: int, headers: bytes, body: bytes
) -> tuple[int, bytes, bytes]:
    """POST /comments written byte for byte; the status, headers and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /comments HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n".encode()
            + headers
            + b"\r\n"
            + body
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = answer.partition(b"\r\n")
    head, _, content = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), head.lower(), content


async def stored(settings: Settings) -> tuple[int, int, int]:
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        return (
            await conn.fetchval("SELECT count(*) FROM comments"),
            await conn.fetchval("SELECT count(*) FROM outbox"),
            await conn.fetchval("SELECT count(*) FROM idempotency_keys"),
        )
    finally:
        await conn.close()


EMPTY_KEY = {
    "field": "idempotency-key",
    "message": "must not be empty; send a key such as a UUID, or no header",
}


async def test_an_empty_idempotency_key_is_refused_naming_the_header(
    served: Served, settings: Settings
) -> None:
    auth = f"Authorization: Bearer {served.token}\r\n".encode()
    body = json.dumps({"post_id": served.post, "body": "hi"}).encode()
    transport = httpx.ASGITransport(app=served.app)

    over_http = [
        await post_raw(served.port, auth + b"Idempotency-Key:" + value + b"\r\n", body)
        for value in (b"", b" ", b"   \t ")
    ]
    # Straight to the app, the spaces arrive as they were sent.
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        direct = await c.post(
            "/comments",
            content=body,
            headers={
                "Authorization": f"Bearer {served.token}",
                "Content-Type": "application/json",
                "Idempotency-Key": "   ",
            },
        )

    for status, answer in [*over_http, (direct.status_code, direct.json())]:
        assert status == 422
        assert answer["error"] == "invalid_request"
        assert answer["fields"] == [EMPTY_KEY]
        assert answer["detail"].startswith("idempotency-key: ")
    assert await stored(settings) == (0, 0, 0)


async def test_a_comment_that_repeats_a_key_is_refused_and_stores_nothing(
    served: Served, settings: Settings
) -> None:
    body = f'{{"post_id": {served.post}, "body": "a", "body": "b"}}'.encode()
    headers = {
        "Authorization": f"Bearer {served.token}",
        "Content-Type": "application/json",
    }

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 5):
            yield body[start : start + 5]

    url = f"http://127.0.0.1:{served.port}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        declared = await client.post("/comments", content=body, headers=headers)
        streamed = await client.post("/comments", content=chunks(), headers=headers)

    for resp in (declared, streamed):
        assert resp.status_code == 422
        assert resp.json()["fields"] == [
            {"field": "body", "message": "key given more than once"}
        ]
    assert await stored(settings) == (0, 0, 0)


@pytest.mark.parametrize(
    "keys",
    [(b"key-1", b"key-2"), (b"key-1", b"key-1"), (b"", b"key-2")],
    ids=["different", "equal", "empty-first"],
)
async def test_a_comment_with_two_idempotency_keys_is_refused_and_stores_nothing(
    served: Served, settings: Settings, keys: tuple[bytes, bytes]
) -> None:
    auth = f"Authorization: Bearer {served.token}\r\n".encode()
    headers = b"".join(b"Idempotency-Key: " + key + b"\r\n" for key in keys)
    body = json.dumps({"post_id": served.post, "body": "hi"}).encode()

    status, answer = await post_raw(served.port, auth + headers, body)

    assert status == 422
    assert answer["error"] == "invalid_request"
    assert [f["field"] for f in answer["fields"]] == ["idempotency-key"]
    assert answer["detail"].startswith("idempotency-key: ")
    assert await stored(settings) == (0, 0, 0)


NOT_PRINTABLE = {
    "field": "idempotency-key",
    "message": "must be printable ASCII, such as a UUID",
}


async def test_a_tab_in_the_idempotency_key_is_refused_naming_the_header(
    served: Served, settings: Settings
) -> None:
    auth = f"Authorization: Bearer {served.token}\r\n".encode()
    body = json.dumps({"post_id": served.post, "body": "hi"}).encode()

    status, answer = await post_raw(
        served.port, auth + b"Idempotency-Key: key\tone\r\n", body
    )

    assert (status, answer["fields"]) == (422, [NOT_PRINTABLE])
    assert await stored(settings) == (0, 0, 0)


# Other control characters never reach the app under httptools, which the
# services run on: it answers the request itself, in plain text.
@pytest.mark.parametrize("control", [b"\x01", b"\x1b", b"\x7f"])
async def test_a_control_character_in_the_idempotency_key_stores_nothing(
    served: Served, settings: Settings, control: bytes
) -> None:
    auth = f"Authorization: Bearer {served.token}\r\n".encode()
    body = json.dumps({"post_id": served.post, "body": "hi"}).encode()

    status, head, content = await post_bytes(
        served.port, auth + b"Idempotency-Key: key" + control + b"1\r\n", body
    )

    assert status == 400
    assert b"content-type: text/plain" in head
    assert content == b"Invalid HTTP request received."
    assert await stored(settings) == (0, 0, 0)


# h11, uvicorn's parser where httptools is missing, hands them to the app.
@pytest.mark.parametrize("served", ["h11"], indirect=True)
@pytest.mark.parametrize("control", [b"\x01", b"\x1b", b"\x7f"])
async def test_a_control_character_the_server_lets_through_is_refused_by_the_app(
    served: Served, settings: Settings, control: bytes
) -> None:
    auth = f"Authorization: Bearer {served.token}\r\n".encode()
    body = json.dumps({"post_id": served.post, "body": "hi"}).encode()

    status, answer = await post_raw(
        served.port, auth + b"Idempotency-Key: key" + control + b"1\r\n", body
    )

    assert (status, answer["fields"]) == (422, [NOT_PRINTABLE])
    assert await stored(settings) == (0, 0, 0)
