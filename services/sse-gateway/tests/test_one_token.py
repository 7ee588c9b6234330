"""A request to the gateway gives one bearer token, on the real PostgreSQL.

The stream, the inbox, the preferences and the page's own routes take the same
token from a request, or refuse it before anything else is judged: a query that
gives ``token`` twice, or one beside an Authorization header that carries
another, is a 422 naming ``token`` that changes nothing and opens no stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Message

from contracts.auth import issue_token
from contracts.settings import Settings
from sse_gateway import inbox
from sse_gateway.app import GatewaySettings, create_app
from tests.sse import helpers
from tests.support.data import Demo, seed_demo

pytestmark = pytest.mark.integration

PAGE = "https://app.example"
JSON = {"Content-Type": "application/json"}
PREFERENCES = "SELECT user_id, type, enabled FROM notification_preferences"
# How long a call to the app may take before the test gives up on it.
DEADLINE = 20.0


@dataclass
class Gateway:
    app: FastAPI
    client: httpx.AsyncClient
    bob: str
    alice: str


@pytest.fixture
async def demo(settings: Settings) -> Demo:
    return await seed_demo(settings.database_url)


@pytest.fixture
async def gateway(settings: Settings, demo: Demo) -> AsyncIterator[Gateway]:
    """A running gateway that a page on :data:`PAGE` may call, and two tokens."""
    options = {**settings.model_dump(), "cors_origins": PAGE}
    app = create_app(GatewaySettings(**options))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client,
    ):
        yield Gateway(
            app,
            client,
            bob=issue_token(demo.bob, "bob", settings),
            alice=issue_token(demo.alice, "alice", settings),
        )


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def stream(
    app: FastAPI,
    query: str = "",
    headers: list[tuple[str, str]] | None = None,
    method: str = "GET",
) -> Answer:
    """Ask ``app`` for ``/sse`` as a server would; the answer's status, headers and
    first part of its body, after which the client hangs up."""
    sent: list[Message] = []
    hung_up = asyncio.Event()

    async def receive() -> Message:
        await hung_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            hung_up.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/sse",
        "raw_path": b"/sse",
        "root_path": "",
        "query_string": query.encode(),
        "headers": [
            (name.lower().encode(), value.encode()) for name, value in headers or []
        ],
        "server": ("127.0.0.1", 8081),
        "client": ("127.0.0.1", 50000),
    }
    async with asyncio.timeout(DEADLINE):
        await app(scope, receive, send)

    start = next(m for m in sent if m["type"] == "http.response.start")
    bodies = [m.get("body", b"") for m in sent if m["type"] == "http.response.body"]
    return Answer(
        start["status"],
        {k.decode(): v.decode() for k, v in start["headers"]},
        next((body for body in bodies if body), b""),
    )


def refused_naming(status: int, body: bytes, field: str) -> bool:
    """Whether an answer is the 422 that names ``field`` and nothing else."""
    answer = json.loads(body or b"{}")
    return (
        status == 422
        and answer.get("error") == "invalid_request"
        and [f["field"] for f in answer.get("fields", [])] == [field]
    )


async def unread(settings: Settings, user_id: int) -> int:
    async with helpers.database(settings.database_url) as pg:
        return await pg.fetchval(inbox.UNREAD, user_id)


async def stored_preferences(settings: Settings) -> list[Any]:
    async with helpers.database(settings.database_url) as pg:
        return [tuple(row) for row in await pg.fetch(PREFERENCES)]


async def test_a_token_given_twice_in_the_query_is_refused_by_every_route(
    gateway: Gateway, settings: Settings, demo: Demo
) -> None:
    async with helpers.database(settings.database_url) as pg:
        mine = await helpers.add_and_deliver(pg, demo.bob, "unread")
    bob, alice = gateway.bob, gateway.alice
    # The same token twice, two users' tokens either way round, and a forged one
    # that would otherwise be a 401: none of them is judged.
    twice = [
        f"token={bob}&token={bob}",
        f"token={bob}&token={alice}",
        f"token={alice}&token={bob}",
        f"token=forged&limit=5&token={bob}",
    ]
    routes = [
        ("GET", "/inbox", {}),
        ("HEAD", "/inbox", {}),
        ("GET", "/inbox/unread-count", {}),
        ("POST", "/inbox/read-all", {}),
        ("POST", f"/inbox/{mine}/read", {}),
        ("POST", f"/inbox/{mine}/archive", {}),
        ("GET", "/preferences", {}),
        ("PATCH", "/preferences", {"json": {"email": False}}),
        ("PATCH", "/preferences", {"content": b"{oops", "headers": JSON}),
        ("GET", "/config.json", {}),
        ("GET", "/", {}),
    ]

    answers = {
        (method, path, query): await gateway.client.request(
            method, f"{path}?{query}", **options
        )
        for method, path, options in routes
        for query in twice
    }

    for (method, path, query), answer in answers.items():
        if method == "HEAD":
            assert answer.status_code == 422, (path, query)
            continue
        assert refused_naming(answer.status_code, answer.content, "token"), (
            method,
            path,
            query,
            answer.text,
        )
        assert bob not in answer.text and alice not in answer.text
    assert await unread(settings, demo.bob) == 1
    assert await stored_preferences(settings) == []


async def test_a_stream_asked_for_with_a_token_given_twice_is_refused_and_never_opens(
    gateway: Gateway,
) -> None:
    bob, alice = gateway.bob, gateway.alice
    queries = [
        f"token={bob}&token={bob}",
        f"token={bob}&token={alice}",
        f"token={alice}&token={bob}",
        f"token=forged&token={bob}",
    ]

    answers = [await stream(gateway.app, query) for query in queries]
    head = await stream(gateway.app, queries[1], method="HEAD")

    for query, answer in zip(queries, answers, strict=True):
        assert refused_naming(answer.status, answer.body, "token"), (query, answer)
        assert answer.headers["content-type"] == "application/json"
        assert bob.encode() not in answer.body
    assert head.status == 422
    assert head.headers["content-type"] == "application/json"
    assert gateway.app.state.hub.connections == 0


async def test_a_query_token_other_than_the_authorization_header_s_is_refused(
    gateway: Gateway, settings: Settings, demo: Demo
) -> None:
    bob, alice = gateway.bob, gateway.alice
    async with helpers.database(settings.database_url) as pg:
        await helpers.add_and_deliver(pg, demo.bob, "unread")
    headers = [
        ("Authorization", f"Bearer {bob}"),
        # Not a bearer token at all: still a second credential beside the query's.
        ("Authorization", "Basic Ym9iOmJvYg=="),
    ]

    streams = [
        await stream(gateway.app, f"token={alice}", [header]) for header in headers
    ]
    routes = [
        await gateway.client.request(
            method, f"{path}?token={alice}", headers=[header], **options
        )
        for header in headers
        for method, path, options in [
            ("GET", "/inbox", {}),
            ("POST", "/inbox/read-all", {}),
            ("PATCH", "/preferences", {"json": {"push": False}}),
        ]
    ]

    for answer in streams:
        assert refused_naming(answer.status, answer.body, "token"), answer
    for response in routes:
        assert refused_naming(response.status_code, response.content, "token"), (
            response.request.url.path,
            response.text,
        )
    assert gateway.app.state.hub.connections == 0
    assert await unread(settings, demo.bob) == 1
    assert await stored_preferences(settings) == []


async def test_authorization_given_twice_is_refused_naming_it(
    gateway: Gateway, settings: Settings, demo: Demo
) -> None:
    bob, alice = gateway.bob, gateway.alice
    async with helpers.database(settings.database_url) as pg:
        await helpers.add_and_deliver(pg, demo.bob, "unread")
    both = [("Authorization", f"Bearer {bob}"), ("Authorization", f"Bearer {alice}")]

    opened = await stream(gateway.app, headers=both)
    marked = await gateway.client.post("/inbox/read-all", headers=both)

    assert refused_naming(opened.status, opened.body, "authorization"), opened
    assert refused_naming(marked.status_code, marked.content, "authorization")
    assert gateway.app.state.hub.connections == 0
    assert await unread(settings, demo.bob) == 1


async def test_a_head_of_the_stream_answers_with_the_headers_of_its_get(
    gateway: Gateway,
) -> None:
    query = f"token={gateway.bob}"

    got = await stream(gateway.app, query)
    head = await stream(gateway.app, query, method="HEAD")

    assert (head.status, head.headers) == (got.status, got.headers)
    # What keeps a proxy from holding the stream's events back.
    assert head.headers["x-accel-buffering"] == "no"
    assert head.body == b""


async def test_one_token_in_the_query_or_the_header_or_both_alike_is_taken(
    gateway: Gateway, demo: Demo
) -> None:
    bob = gateway.bob
    ways: list[tuple[str, list[tuple[str, str]]]] = [
        (f"token={bob}", []),
        ("", [("Authorization", f"Bearer {bob}")]),
        (f"token={bob}", [("Authorization", f"Bearer {bob}")]),
    ]

    streams = [await stream(gateway.app, query, headers) for query, headers in ways]
    heads = [
        await stream(gateway.app, query, headers, method="HEAD")
        for query, headers in ways
    ]
    inboxes = [
        await gateway.client.get(f"/inbox?{query}&limit=5", headers=headers)
        for query, headers in ways
    ]
    preferences = [
        await gateway.client.get(f"/preferences?{query}", headers=headers)
        for query, headers in ways
    ]

    for answer in streams:
        assert answer.status == 200, answer
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert b": connected" in answer.body
    assert [answer.status for answer in heads] == [200, 200, 200]
    for response in [*inboxes, *preferences]:
        assert response.status_code == 200, (response.request.url.path, response.text)
    assert {response.json()["email"] for response in preferences} == {True}
    assert gateway.app.state.hub.connections == 0


async def test_a_token_refusal_carries_the_cors_headers_of_a_normal_answer(
    gateway: Gateway,
) -> None:
    bob, alice = gateway.bob, gateway.alice
    origin = [("Origin", PAGE)]

    normal = await gateway.client.get(
        "/inbox/unread-count", headers=[*origin, ("Authorization", f"Bearer {bob}")]
    )
    refused = await gateway.client.get(
        f"/inbox/unread-count?token={bob}&token={alice}", headers=origin
    )
    opened = await stream(gateway.app, f"token={bob}&token={alice}", origin)
    # The browser asks first whether it may send the request at all; it is the
    # request itself that is refused, where the page can read why.
    preflight = await gateway.client.options(
        f"/inbox/unread-count?token={bob}&token={alice}",
        headers=[*origin, ("Access-Control-Request-Method", "GET")],
    )

    assert normal.status_code == 200
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == PAGE
    assert refused.status_code == 422
    assert opened.status == 422
    assert refused.headers["access-control-allow-origin"] == PAGE
    assert opened.headers["access-control-allow-origin"] == PAGE
    assert refused.headers["vary"] == normal.headers["vary"]
    for answer in (refused, opened):
        assert (
            answer.headers["access-control-expose-headers"]
            == (normal.headers["access-control-expose-headers"])
        )


async def test_a_refused_preflight_with_two_tokens_is_answered_in_json(
    gateway: Gateway,
) -> None:
    bob, alice = gateway.bob, gateway.alice

    preflight = await gateway.client.options(
        f"/inbox/unread-count?token={bob}&token={alice}",
        headers=[
            ("Origin", "https://elsewhere.example"),
            ("Access-Control-Request-Method", "GET"),
        ],
    )

    assert preflight.status_code == 400
    assert preflight.json()["error"] == "cors_refused"
    assert "origin" in preflight.json()["fields"][0]["field"]


async def test_a_query_token_that_no_header_can_carry_is_refused_as_invalid(
    gateway: Gateway,
) -> None:
    # "€" cannot travel in a header as HTTP reads it; it is no token either.
    answer = await gateway.client.get("/inbox/unread-count?token=%E2%82%AC")
    opened = await stream(gateway.app, "token=%E2%82%AC")

    assert answer.status_code == 401, answer.text
    assert answer.json() == {"error": "unauthorized", "detail": "token is invalid"}
    assert opened.status == 401
    assert json.loads(opened.body)["detail"] == "token is invalid"


async def test_a_last_event_id_given_twice_is_refused_and_opens_no_stream(
    gateway: Gateway,
) -> None:
    answer = await stream(
        gateway.app,
        headers=[
            ("Authorization", f"Bearer {gateway.bob}"),
            ("Last-Event-ID", "930"),
            ("Last-Event-ID", "5"),
        ],
    )

    assert refused_naming(answer.status, answer.body, "last-event-id"), answer
    assert json.loads(answer.body)["fields"][0]["message"] == (
        "given more than once; send the last id received"
    )
