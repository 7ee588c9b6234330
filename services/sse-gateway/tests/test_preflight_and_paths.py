"""How the gateway answers a browser's preflight to ``/sse``, a path that ends in a
slash and a method a path does not take, on the real PostgreSQL.

``/sse`` is served ahead of FastAPI, but its preflight goes through the same CORS
handling as any other route's. A 405 lists every method its path takes, also where
several routes share the path. A path no route takes is a JSON 404, also when it
differs from a route's by a trailing slash: a redirect built after the query's
token was taken out of it would lead a browser on without its token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI

from contracts.auth import issue_token, unsubscribe_token
from contracts.settings import Settings
from sse_gateway.app import GatewaySettings, create_app
from tests.support.data import seed_demo

pytestmark = pytest.mark.integration

PAGE = "https://app.example"


@dataclass
class Gateway:
    app: FastAPI
    client: httpx.AsyncClient
    bob: int
    token: str


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """A running gateway that a page on :data:`PAGE` may call, and bob's token."""
    demo = await seed_demo(settings.database_url)
    options = {**settings.model_dump(), "cors_origins": PAGE}
    app = create_app(GatewaySettings(**options))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client,
    ):
        yield Gateway(app, client, demo.bob, issue_token(demo.bob, "bob", settings))


def preflight(origin: str) -> list[tuple[str, str]]:
    """What a browser sends before a fetch-based stream with its own headers."""
    return [
        ("Origin", origin),
        ("Access-Control-Request-Method", "GET"),
        ("Access-Control-Request-Headers", "authorization, last-event-id"),
    ]


async def test_a_stream_s_preflight_from_the_page_allows_its_headers(
    gateway: Gateway,
) -> None:
    answer = await gateway.client.options("/sse", headers=preflight(PAGE))

    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == PAGE
    allowed = answer.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "last-event-id" in allowed
    assert "GET" in answer.headers["access-control-allow-methods"]
    assert gateway.app.state.hub.connections == 0


async def test_a_stream_s_preflight_from_another_origin_is_refused_in_json(
    gateway: Gateway,
) -> None:
    answer = await gateway.client.options(
        "/sse", headers=preflight("https://elsewhere.example")
    )

    assert answer.status_code == 400
    assert answer.json()["error"] == "cors_refused"
    assert [f["field"] for f in answer.json()["fields"]] == ["origin"]
    assert "access-control-allow-origin" not in answer.headers


async def test_an_options_request_to_the_stream_that_is_no_preflight_is_405(
    gateway: Gateway,
) -> None:
    answer = await gateway.client.options("/sse")

    assert answer.status_code == 405
    assert answer.json()["error"] == "method_not_allowed"
    assert "GET" in answer.headers["allow"]


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/preferences?token={t}", "GET, HEAD, PATCH"),
        ("/unsubscribe?token={t}", "GET, HEAD, POST"),
        ("/sse?token={t}", "GET, HEAD"),
    ],
)
async def test_a_method_a_path_does_not_take_is_405_listing_every_one_it_does(
    gateway: Gateway, path: str, allowed: str
) -> None:
    answer = await gateway.client.put(path.format(t=gateway.token), json={})

    assert answer.status_code == 405, answer.text
    assert answer.json()["error"] == "method_not_allowed"
    assert answer.headers["allow"] == allowed
    assert gateway.app.state.hub.connections == 0


@pytest.mark.parametrize(
    "path", ["/inbox/?token={t}&limit=2", "/unsubscribe/?token={t}", "/sse/?token={t}"]
)
async def test_a_path_with_a_trailing_slash_is_a_404_that_leads_nowhere(
    gateway: Gateway, path: str
) -> None:
    answer = await gateway.client.get(path.format(t=gateway.token))

    assert answer.status_code == 404, answer.headers
    assert answer.json()["error"] == "not_found"
    assert "location" not in answer.headers
    assert gateway.token not in answer.text


async def test_an_unsubscribe_link_reads_no_authorization_header(
    gateway: Gateway, settings: Settings
) -> None:
    link = unsubscribe_token(gateway.bob, settings.secret_key)
    others = [("Authorization", "Bearer one"), ("Authorization", "Bearer two")]

    page = await gateway.client.get(f"/unsubscribe?token={link}", headers=others)

    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
