"""What the operations routes of the services without a public API answer over
HTTP: HEAD wherever GET is answered, and the project's JSON errors."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI

from dispatcher.app import DispatcherSettings
from dispatcher.app import create_app as dispatcher_app
from email_sender.app import EmailSettings
from email_sender.app import create_app as email_sender_app

APPS: dict[str, Callable[[], FastAPI]] = {
    "dispatcher": lambda: dispatcher_app(DispatcherSettings(env="test")),
    "email-sender": lambda: email_sender_app(EmailSettings(env="test")),
}


def client(service: str) -> httpx.AsyncClient:
    # Unstarted: the routes answer without the database and broker (/readyz
    # says they are missing), which is all these tests look at.
    transport = httpx.ASGITransport(app=APPS[service]())
    return httpx.AsyncClient(transport=transport, base_url="http://t")


@pytest.mark.parametrize("service", APPS)
async def test_every_operations_route_answers_head_as_its_get(service: str) -> None:
    async with client(service) as http:
        pairs = [
            (await http.get(path), await http.head(path))
            for path in ("/healthz", "/readyz", "/metrics")
        ]

    assert [get.status_code for get, _ in pairs] == [200, 503, 200]
    for get, head in pairs:
        assert head.status_code == get.status_code, get.url
        assert head.headers["content-type"] == get.headers["content-type"]
        assert head.content == b""
    healthz_get, healthz_head = pairs[0]
    assert healthz_head.headers == healthz_get.headers


@pytest.mark.parametrize("service", APPS)
async def test_an_unknown_path_or_method_gets_the_json_error_shape(
    service: str,
) -> None:
    async with client(service) as http:
        missing = await http.get("/nope")
        slashed = await http.get("/healthz/")
        posted = await http.post("/healthz")

    for answer in (missing, slashed):
        assert answer.status_code == 404
        assert answer.json() == {"error": "not_found", "detail": "Not Found"}
    assert posted.status_code == 405
    assert posted.json()["error"] == "method_not_allowed"
    assert posted.headers["allow"] == "GET, HEAD"
