"""An escaped slash or backslash in a path reaches no route of any service: each
resource answers at one address, whatever uvicorn decodes."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI

from comments.app import create_app as comments_app
from contracts.settings import Settings
from sse_gateway.app import GatewaySettings
from sse_gateway.app import create_app as gateway_app

# Routes of two segments or more, each spelt with its first slash escaped.
ESCAPED: list[tuple[str, Callable[[], FastAPI], str, str]] = [
    ("comments", lambda: comments_app(Settings(env="test")), "GET", "/posts%2F1"),
    ("comments", lambda: comments_app(Settings(env="test")), "GET", "/posts%5c1"),
    (
        "sse-gateway",
        lambda: gateway_app(GatewaySettings(env="test")),
        "GET",
        "/inbox%2funread-count",
    ),
    (
        "sse-gateway",
        lambda: gateway_app(GatewaySettings(env="test")),
        "POST",
        "/inbox/1%2Fread",
    ),
    (
        "sse-gateway",
        lambda: gateway_app(GatewaySettings(env="test")),
        "HEAD",
        "/static%2Fapp.js",
    ),
]


@pytest.mark.parametrize(
    ("service", "make", "method", "path"),
    ESCAPED,
    ids=[f"{service} {method} {path}" for service, _, method, path in ESCAPED],
)
async def test_a_path_with_an_escaped_slash_is_not_found(
    service: str, make: Callable[[], FastAPI], method: str, path: str
) -> None:
    # Unstarted: a route that reaches the runtime fails with a 500, and only
    # whether a route was reached matters here.
    transport = httpx.ASGITransport(app=make(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        answer = await http.request(method, path)
        # The same route, spelt plainly, is there: only the escape is refused.
        plain = await http.request(
            method, path.replace("%2F", "/").replace("%2f", "/").replace("%5c", "/")
        )

    assert answer.status_code == 404
    if method != "HEAD":
        assert answer.json() == {"error": "not_found", "detail": "Not Found"}
    assert plain.status_code != 404


async def test_a_preflight_for_a_path_with_an_escaped_slash_is_not_found() -> None:
    settings = Settings(env="test", cors_origins="http://page.example")
    transport = httpx.ASGITransport(app=comments_app(settings))
    preflight = {
        "Origin": "http://page.example",
        "Access-Control-Request-Method": "POST",
    }
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        escaped = await http.options("/posts%2F1", headers=preflight)
        plain = await http.options("/comments", headers=preflight)

    assert escaped.status_code == 404
    assert plain.status_code == 200
