"""What the email sender's operations routes answer over HTTP: HEAD wherever GET
is answered, and the project's JSON errors."""

from __future__ import annotations

import httpx

from email_sender.app import EmailSettings, create_app


def client() -> httpx.AsyncClient:
    # Unstarted: the routes answer without the database and broker (/readyz
    # says they are missing), which is all these tests look at.
    app = create_app(EmailSettings(env="test"))
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


async def test_every_operations_route_answers_head_as_its_get() -> None:
    async with client() as http:
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


async def test_an_unknown_path_or_method_gets_the_json_error_shape() -> None:
    async with client() as http:
        missing = await http.get("/nope")
        posted = await http.post("/healthz")

    assert missing.status_code == 404
    assert missing.json() == {"error": "not_found", "detail": "Not Found"}
    assert posted.status_code == 405
    assert posted.json()["error"] == "method_not_allowed"
    assert posted.headers["allow"] == "GET"
