"""The subscription API: a user's own subscriptions, and what a bad one gets."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI

from contracts.auth import issue_token
from contracts.settings import Settings
from push_sender.app import create_app
from push_sender.settings import PushSettings
from push_sender.vapid import public_point
from tests.push.conftest import VapidPair
from tests.support.data import Demo
from tests.support.push_service import PushService


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def auth(settings: Settings, user_id: int) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(user_id, 'x', settings)}"}


@pytest.mark.integration
async def test_a_user_adds_lists_and_removes_only_their_own(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
) -> None:
    bob, carol = auth(settings, demo.bob), auth(settings, demo.carol)
    phone = push_service.device()
    created = await api.post(
        "/push/subscriptions",
        json=phone.subscription(),
        headers={**bob, "User-Agent": "Phone/1.0"},
    )
    await api.post(
        "/push/subscriptions", json=push_service.device().subscription(), headers=carol
    )

    mine = await api.get("/push/subscriptions", headers=bob)
    path = f"/push/subscriptions/{created.json()['id']}"
    stolen = await api.delete(path, headers=carol)
    missing = await api.delete("/push/subscriptions/999999", headers=bob)
    removed = await api.delete(path, headers=bob)
    after = await api.get("/push/subscriptions", headers=bob)

    assert created.status_code == 201, created.text
    assert created.json()["endpoint"] == phone.endpoint
    assert created.json()["user_agent"] == "Phone/1.0"
    assert [s["endpoint"] for s in mine.json()] == [phone.endpoint]
    assert "auth" not in mine.json()[0] and "p256dh" not in mine.json()[0]
    assert stolen.status_code == 404 and stolen.json()["error"] == "not_found"
    assert missing.status_code == 404
    assert removed.status_code == 204
    assert after.json() == []


@pytest.mark.integration
async def test_subscribing_the_same_browser_again_replaces_its_row(
    settings: Settings, demo: Demo, push_service: PushService, api: httpx.AsyncClient
) -> None:
    device = push_service.device()
    first = await api.post(
        "/push/subscriptions",
        json=device.subscription(),
        headers=auth(settings, demo.bob),
    )
    # Another person logs in on the same browser and subscribes it.
    again = await api.post(
        "/push/subscriptions",
        json=device.subscription(),
        headers=auth(settings, demo.carol),
    )
    bobs = await api.get("/push/subscriptions", headers=auth(settings, demo.bob))
    carols = await api.get("/push/subscriptions", headers=auth(settings, demo.carol))

    assert again.status_code == 201 and again.json()["id"] == first.json()["id"]
    assert bobs.json() == [] and len(carols.json()) == 1


@pytest.mark.integration
async def test_the_page_gets_the_vapid_key_and_cors_headers(
    vapid_pair: VapidPair, push_settings: PushSettings
) -> None:
    settings = push_settings.model_copy(update={"cors_origins": "http://page:8081"})
    app = create_app(settings)
    async with _client(app) as client:
        key = await client.get("/push/vapid-public-key")
        preflight = await client.options(
            "/push/subscriptions",
            headers={
                "Origin": "http://page:8081",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        unauthorized = await client.get("/push/subscriptions")

    assert key.json() == {"public_key": vapid_pair.public}
    assert len(base64.urlsafe_b64decode(vapid_pair.public + "=")) == 65
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://page:8081"
    assert unauthorized.status_code == 401


# Validation runs before any query, so these need neither database nor broker.

P256DH = b64(public_point(ec.generate_private_key(ec.SECP256R1()).public_key()))
AUTH = b64(os.urandom(16))
GOOD = {
    "endpoint": "https://push.example.net/x",
    "keys": {"p256dh": P256DH, "auth": AUTH},
}


def _with(**changes: Any) -> dict[str, Any]:
    body = {**GOOD, "keys": dict(GOOD["keys"])}
    for key, value in changes.items():
        if key in ("p256dh", "auth"):
            if value is None:
                del body["keys"][key]
            else:
                body["keys"][key] = value
        elif value is None:
            del body[key]
        else:
            body[key] = value
    return body


@pytest.fixture
async def strict_api(vapid_pair: VapidPair) -> AsyncIterator[httpx.AsyncClient]:
    settings = PushSettings(
        env="development",
        vapid_private_key=vapid_pair.pem,
        push_allowed_hosts="push.example.net",
    )
    async with _client(create_app(settings)) as client:
        yield client


@pytest.fixture
async def open_api(vapid_pair: VapidPair) -> AsyncIterator[httpx.AsyncClient]:
    settings = PushSettings(env="test", vapid_private_key=vapid_pair.pem)
    async with _client(create_app(settings)) as client:
        yield client


def _client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://push")


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        (_with(endpoint="http://push.example.net/x"), "endpoint", "https"),
        (_with(endpoint="https://evil.example.org/x"), "endpoint", "not an allowed"),
        (_with(endpoint="push.example.net/x"), "endpoint", "https"),
        (_with(endpoint="https://u:p@push.example.net/x"), "endpoint", "credentials"),
        (_with(endpoint=None), "endpoint", "required"),
        (_with(keys=None), "keys", "required"),
        (_with(p256dh=None), "keys.p256dh", "required"),
        (_with(auth=None), "keys.auth", "required"),
        (_with(p256dh=b64(b"\x04" + os.urandom(63))), "keys.p256dh", "65 bytes"),
        (_with(p256dh=b64(b"\x02" + os.urandom(64))), "keys.p256dh", "65 bytes"),
        (_with(p256dh=b64(b"\x04" + b"\x01" * 64)), "keys.p256dh", "curve"),
        (_with(p256dh="not base64!"), "keys.p256dh", "base64url"),
        (_with(auth=b64(os.urandom(15))), "keys.auth", "16 bytes"),
        (_with(auth=AUTH + "=="), "keys.auth", "base64url"),
    ],
)
async def test_a_bad_subscription_is_refused_naming_the_field(
    strict_api: httpx.AsyncClient, body: dict[str, Any], field: str, says: str
) -> None:
    token = issue_token(1, "bob", Settings())
    resp = await strict_api.post(
        "/push/subscriptions", json=body, headers={"Authorization": f"Bearer {token}"}
    )

    assert resp.status_code == 422, resp.text
    fields = {f["field"]: f["message"] for f in resp.json()["fields"]}
    assert field in fields, fields
    assert says in fields[field]


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:9/push",
        "https://127.0.0.1/push",
        "https://localhost/push",
        "https://[::1]/push",
        "https://10.1.2.3/push",
        "https://169.254.169.254/push",
    ],
)
async def test_without_an_allow_list_only_public_https_hosts_are_accepted(
    open_api: httpx.AsyncClient, endpoint: str
) -> None:
    token = issue_token(1, "bob", Settings())
    resp = await open_api.post(
        "/push/subscriptions",
        json=_with(endpoint=endpoint),
        headers={"Authorization": f"Bearer {token}"},
    )

    assert resp.status_code == 422, resp.text
    assert resp.json()["fields"][0]["field"] == "endpoint"
