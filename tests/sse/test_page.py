"""What the demo page relies on: the page itself, its settings, demo tokens, CORS."""

from __future__ import annotations

import asyncio
from typing import Literal

import httpx
import pytest

from comments.app import create_app as create_comments
from contracts.settings import Settings
from tests.sse.conftest import StartGateway

pytestmark = pytest.mark.integration


async def test_the_gateway_serves_the_page_and_its_settings(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway(NOTIFLOW_API_BASE_URL="http://127.0.0.1:9999/")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
        page = await client.get("/")
        config = (await client.get("/config.json")).json()
        script = await client.get("/static/app.js")
        push = await client.get("/static/push.js")
    assert page.status_code == 200 and page.headers["content-type"].startswith(
        "text/html"
    )
    assert '<div id="push-controls"></div>' in page.text
    assert '<script src="/static/push.js" defer></script>' in page.text
    assert config["api_base_url"] == "http://127.0.0.1:9999"
    assert config["dev_tokens"] is False
    assert script.status_code == 200 and push.status_code == 200


async def test_a_static_file_is_served_at_its_one_path_only(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway()
    paths = [
        "/static/app.js",
        "/static/app.js/",
        "/static//app.js",
        "/static/./app.js",
        "/static/",
        "/static%2fapp.js",
        # The page itself, only at /, where it is answered with its headers.
        "/static/index.html",
        "/static/INDEX.HTML",
    ]

    # Sent as written: an HTTP client would tidy the dots and slashes away.
    answers = [await _status_of(gateway.port, path) for path in paths]

    assert answers == [b"200"] + [b"404"] * 7


@pytest.mark.parametrize(
    "given", ["chars=0-10", "bytes=5-1", "bytes=0-5", "bytes=999999-", "bytes=x"]
)
async def test_a_file_asked_for_in_part_is_served_whole(
    start_gateway: StartGateway, given: str
) -> None:
    gateway = start_gateway()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
        whole = await client.get("/static/app.js")
        answers = [
            await client.get(path, headers={"Range": given})
            for path in ("/", "/static/app.js", "/sw.js", "/favicon.ico")
        ]

    assert [a.status_code for a in answers] == [200] * 4
    assert answers[1].content == whole.content
    assert all("accept-ranges" not in a.headers for a in (whole, *answers))


async def _status_of(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    return status_line.split()[1]


def test_demo_tokens_exist_only_in_development() -> None:
    def paths(env: Literal["development", "test"]) -> set[str]:
        app = create_comments(Settings(env=env))
        return set(app.openapi()["paths"])

    assert "/dev/token" in paths("development")
    assert "/dev/token" not in paths("test")


def test_cors_defaults_to_the_demo_page_in_development() -> None:
    assert Settings(env="development").allowed_origins == [
        "http://127.0.0.1:8081",
        "http://localhost:8081",
    ]
    assert Settings(env="test").allowed_origins == []
    configured = Settings(env="test", cors_origins="https://a.example, ")
    assert configured.allowed_origins == ["https://a.example"]
