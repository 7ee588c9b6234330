"""The subscription API: a user's own subscriptions, and what a bad one gets."""

from __future__ import annotations

import base64
import json
import os
import string
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI

from contracts.auth import MAX_ID, issue_token
from contracts.settings import Settings
from push_sender.app import create_app
from push_sender.settings import PushSettings
from push_sender.vapid import public_point
from tests.push.conftest import FakeDNS, VapidPair, auth
from tests.support.data import Demo
from tests.support.ids import other_spellings
from tests.support.push_service import PushService


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


JSON = {"Content-Type": "application/json"}


async def subscribed(
    api: httpx.AsyncClient, push_service: PushService, user: dict[str, str]
) -> int:
    """The id of a new subscription of a new device for ``user`` (its headers)."""
    created = await api.post(
        "/push/subscriptions", json=push_service.device().subscription(), headers=user
    )
    assert created.status_code == 201, created.text
    return int(created.json()["id"])


@pytest.mark.integration
async def test_removing_a_subscription_with_a_body_is_refused_and_removes_nothing(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
) -> None:
    bob = auth(settings, demo.bob)
    path = f"/push/subscriptions/{await subscribed(api, push_service, bob)}"

    refused = {
        body: await api.request(
            "DELETE", path, content=body, headers={**bob, **headers}
        )
        for body, headers in [
            (b'{"x": 1}', JSON),
            (b"[]", JSON),
            (b"null", JSON),
            (b"notjson", JSON),
            (b"hello", {"Content-Type": "text/plain"}),
        ]
    }
    kept = await api.get("/push/subscriptions", headers=bob)
    empty = await api.request("DELETE", path, content=b"{}", headers={**bob, **JSON})

    assert {body: r.status_code for body, r in refused.items()} == {
        b'{"x": 1}': 422,
        b"[]": 422,
        b"null": 422,
        b"notjson": 422,
        b"hello": 415,
    }
    assert len(kept.json()) == 1
    assert empty.status_code == 204


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
    largest = await api.delete(f"/push/subscriptions/{MAX_ID}", headers=bob)
    removed = await api.delete(path, headers=bob)
    after = await api.get("/push/subscriptions", headers=bob)

    assert created.status_code == 201, created.text
    assert created.json()["endpoint"] == phone.endpoint
    assert created.json()["user_agent"] == "Phone/1.0"
    assert [s["endpoint"] for s in mine.json()] == [phone.endpoint]
    assert "auth" not in mine.json()[0] and "p256dh" not in mine.json()[0]
    assert stolen.status_code == 404 and stolen.json()["error"] == "not_found"
    assert missing.status_code == 404
    assert largest.status_code == 404
    assert removed.status_code == 204
    assert after.json() == []


@pytest.mark.integration
async def test_a_subscription_is_not_removed_at_an_address_with_an_escaped_slash(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
) -> None:
    bob = auth(settings, demo.bob)
    subscription = await subscribed(api, push_service, bob)

    escaped = await api.delete(f"/push/subscriptions%2F{subscription}", headers=bob)
    kept = await api.get("/push/subscriptions", headers=bob)

    assert escaped.status_code == 404
    assert escaped.json() == {"error": "not_found", "detail": "Not Found"}
    assert [s["id"] for s in kept.json()] == [subscription]


@pytest.mark.integration
async def test_the_same_user_subscribing_again_keeps_the_row_with_new_keys(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    device = push_service.device()
    bob = auth(settings, demo.bob)
    first = await api.post(
        "/push/subscriptions", json=device.subscription(), headers=bob
    )
    renewed = {**device.subscription(), "keys": {"p256dh": P256DH, "auth": AUTH}}

    again = await api.post("/push/subscriptions", json=renewed, headers=bob)

    assert again.status_code == 201, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["created_at"] == first.json()["created_at"]
    stored = await db.fetchrow(
        "SELECT p256dh, auth FROM push_subscriptions WHERE id = $1", first.json()["id"]
    )
    assert (stored["p256dh"], stored["auth"]) == (P256DH, AUTH)


@pytest.mark.integration
async def test_a_browser_subscribed_by_someone_else_moves_revealing_nothing_of_them(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    device = push_service.device()
    first = await api.post(
        "/push/subscriptions",
        json=device.subscription(),
        headers={**auth(settings, demo.bob), "User-Agent": "Bob's laptop"},
    )
    await db.execute(
        "UPDATE push_subscriptions SET last_success_at = now() WHERE id = $1",
        first.json()["id"],
    )

    # Another person signs in on the same browser and subscribes it.
    again = await api.post(
        "/push/subscriptions",
        json=device.subscription(),
        headers={**auth(settings, demo.carol), "User-Agent": "Carol's session"},
    )
    bobs = await api.get("/push/subscriptions", headers=auth(settings, demo.bob))
    carols = await api.get("/push/subscriptions", headers=auth(settings, demo.carol))

    assert again.status_code == 201, again.text
    moved = again.json()
    assert moved["id"] != first.json()["id"]
    assert moved["created_at"] > first.json()["created_at"]
    assert moved["user_agent"] == "Carol's session"
    assert moved["last_success_at"] is None
    assert bobs.json() == []
    assert carols.json() == [moved]


@pytest.mark.parametrize(
    "respell",
    [
        lambda url: url.replace("http://", "HTTP://"),
        lambda url: url.replace("127.0.0.1:", "127.0.0.1:0"),
        lambda url: url + "?",
        lambda url: url.replace("/push/", "/push/./"),
        lambda url: url.replace("/push/", "/push/elsewhere/../"),
        lambda url: url.replace("/push/", "/push/%2E/elsewhere/%2e%2E/"),
        lambda url: url.replace("/push/", "/push/elsewhere/.%2e/"),
    ],
    ids=[
        "scheme-case",
        "port-zero",
        "empty-query",
        "dot",
        "dot-dot",
        "escaped-dots",
        "half-escaped-dot-dot",
    ],
)
@pytest.mark.integration
async def test_another_spelling_of_a_subscribed_endpoint_is_the_same_subscription(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    respell: Callable[[str], str],
) -> None:
    device = push_service.device()
    first = await api.post(
        "/push/subscriptions",
        json=device.subscription(),
        headers=auth(settings, demo.bob),
    )
    assert first.status_code == 201, first.text

    again = await api.post(
        "/push/subscriptions",
        json={**device.subscription(), "endpoint": respell(device.endpoint)},
        headers=auth(settings, demo.carol),
    )
    bobs = await api.get("/push/subscriptions", headers=auth(settings, demo.bob))
    carols = await api.get("/push/subscriptions", headers=auth(settings, demo.carol))

    assert again.status_code == 201, again.text
    assert again.json()["endpoint"] == device.endpoint
    assert bobs.json() == []
    assert [s["endpoint"] for s in carols.json()] == [device.endpoint]


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
        too_large = await client.post(
            "/push/subscriptions",
            content=b"{" + b" " * settings.max_request_bytes + b"}",
            headers={"Origin": "http://page:8081", "Content-Type": "application/json"},
        )

    assert key.json() == {"public_key": vapid_pair.public}
    assert len(base64.urlsafe_b64decode(vapid_pair.public + "=")) == 65
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://page:8081"
    assert unauthorized.status_code == 401
    assert too_large.status_code == 413
    assert too_large.headers["access-control-allow-origin"] == "http://page:8081"


# Validation runs before any query, so these need neither database nor broker.

P256DH = b64(public_point(ec.generate_private_key(ec.SECP256R1()).public_key()))
AUTH = b64(os.urandom(16))
GOOD = {
    "endpoint": "https://push.example.net/x",
    "keys": {"p256dh": P256DH, "auth": AUTH},
}


def _unused_bits_set(text: str) -> str:
    """``text`` with the unused low bits of its last character set: the same bytes
    to a lenient decoder, but not what any encoder writes."""
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    last = alphabet.index(text[-1])
    assert last & 1 == 0, "a 65- or 16-byte key leaves unused bits in its last char"
    return text[:-1] + alphabet[last | 1]


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
async def open_api(
    vapid_pair: VapidPair, dns: FakeDNS
) -> AsyncIterator[httpx.AsyncClient]:
    settings = PushSettings(env="test", vapid_private_key=vapid_pair.pem)
    async with _client(create_app(settings, resolve=dns)) as client:
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
        (_with(endpoint="https://push.example.net:0/x"), "endpoint", "port 0"),
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
        (_with(user_id=2), "user_id", "Extra inputs"),
        (_with(expiration_time=1), "expiration_time", "Extra inputs"),
        (_with(keys={"p256dh": P256DH, "auth": AUTH, "x": ""}), "keys.x", "Extra"),
        (_with(endpoint="https://push.example.net/\u0000"), "endpoint", "U+0000"),
        (_with(endpoint="https://push.example.net/\ud800"), "endpoint", "valid string"),
        (_with(endpoint="https://push.example.net/a b"), "endpoint", "U+0020"),
        (_with(p256dh=P256DH[:20] + "\u0000" + P256DH[20:]), "keys.p256dh", "base64"),
        (_with(auth=AUTH[:8] + "\u0000" + AUTH[8:]), "keys.auth", "base64url"),
        (_with(auth=AUTH[:8] + "." + AUTH[8:]), "keys.auth", "base64url"),
        (_with(p256dh=_unused_bits_set(P256DH)), "keys.p256dh", "unused bits"),
        (_with(auth=_unused_bits_set(AUTH)), "keys.auth", "unused bits"),
    ],
)
async def test_a_bad_subscription_is_refused_naming_the_field(
    strict_api: httpx.AsyncClient, body: dict[str, Any], field: str, says: str
) -> None:
    token = issue_token(1, "bob", Settings())
    # Escaped JSON, as a browser sends it, so that a lone surrogate can travel.
    resp = await strict_api.post(
        "/push/subscriptions",
        content=json.dumps(body),
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
        },
    )

    assert resp.status_code == 422, resp.text
    fields = {f["field"]: f["message"] for f in resp.json()["fields"]}
    assert field in fields, fields
    assert says in fields[field]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (
            _with(endpoint="https://evil.example.org/x", auth=b64(os.urandom(15))),
            {"endpoint": "not an allowed", "keys.auth": "16 bytes"},
        ),
        (
            _with(endpoint="http://push.example.net/x", keys=None),
            {"endpoint": "https", "keys": "required"},
        ),
        (
            _with(endpoint="https://u:p@push.example.net/x", expiration_time=1),
            {"endpoint": "credentials", "expiration_time": "Extra inputs"},
        ),
        # The endpoint's own field check speaks for it, once.
        (
            _with(endpoint="https://push.example.net/a b", p256dh=None),
            {"endpoint": "U+0020", "keys.p256dh": "required"},
        ),
    ],
    ids=["host-and-auth", "scheme-and-keys", "credentials-and-extra", "text-and-key"],
)
async def test_a_subscription_with_several_problems_is_refused_naming_each(
    strict_api: httpx.AsyncClient, body: dict[str, Any], named: dict[str, str]
) -> None:
    token = issue_token(1, "bob", Settings())
    resp = await strict_api.post(
        "/push/subscriptions", json=body, headers={"Authorization": f"Bearer {token}"}
    )

    assert resp.status_code == 422, resp.text
    fields = [(f["field"], f["message"]) for f in resp.json()["fields"]]
    assert sorted(field for field, _ in fields) == sorted(named), fields
    for field, message in fields:
        assert named[field] in message, fields


@pytest.mark.parametrize(
    "content",
    [b'{"endpoint": "https://push.example.net/x",', b'{"endpoint": "\xff"}'],
    ids=["not-json", "not-utf8"],
)
@pytest.mark.parametrize(
    ("authorization", "detail"),
    [(None, "missing bearer token"), ("Bearer forged", "token is invalid")],
    ids=["none", "forged"],
)
async def test_a_bad_token_is_401_before_an_unparsable_subscription_is_judged(
    strict_api: httpx.AsyncClient,
    content: bytes,
    authorization: str | None,
    detail: str,
) -> None:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization

    resp = await strict_api.post(
        "/push/subscriptions", content=content, headers=headers
    )

    assert resp.status_code == 401, resp.text
    assert resp.headers["www-authenticate"] == "Bearer"
    assert resp.json() == {"error": "unauthorized", "detail": detail}


@pytest.mark.parametrize(
    ("endpoint", "says"),
    [
        ("http://127.0.0.1:9/push", "https"),
        ("https://127.0.0.1/push", "not a public address"),
        ("https://localhost/push", "single-label"),
        ("https://[::1]/push", "not a public address"),
        ("https://[::ffff:127.0.0.1]/push", "not a public address"),
        ("https://[64:ff9b::a00:1]/push", "not a public address"),
        ("https://10.1.2.3/push", "not a public address"),
        ("https://169.254.169.254/push", "not a public address"),
        # Blocks the IANA special-purpose registries call not globally reachable
        # that Python 3.11's ipaddress takes for global.
        ("https://192.0.0.8/push", "not a public address"),
        ("https://192.0.0.100/push", "not a public address"),
        ("https://192.88.99.1/push", "not a public address"),
        ("https://[::ffff:192.0.0.8]/push", "not a public address"),
        ("https://[3fff::1]/push", "not a public address"),
        ("https://localhost.:9443/x", "port 9443"),
        ("https://localhost./x", "must not end with a dot"),
        ("https://push.example.net./x", "must not end with a dot"),
        ("https://vm:9443/x", "port 9443"),
        ("https://vm/x", "single-label"),
        ("https://0x7f000001:9443/x", "port 9443"),
        ("https://0x7f000001/x", "numeric"),
        ("https://2130706433/x", "numeric"),
        ("https://127.1/x", "numeric"),
        ("https://0177.0.0.1/x", "numeric"),
        ("https://10.0.0.1.nip.io.0/x", "numeric"),
        ("https://fcm.googleapis.com:22/x", "port 22"),
        ("https://fcm.googleapis.com:8443/x", "port 8443"),
        ("https://push.localhost/x", "not a public address"),
        ("https://%6cocalhost/x", "not a valid DNS name"),
        ("https://push_service.example/x", "not a valid DNS name"),
    ],
)
async def test_without_an_allow_list_only_public_https_hosts_are_accepted(
    open_api: httpx.AsyncClient, dns: FakeDNS, endpoint: str, says: str
) -> None:
    token = issue_token(1, "bob", Settings())
    resp = await open_api.post(
        "/push/subscriptions",
        json=_with(endpoint=endpoint),
        headers={"Authorization": f"Bearer {token}"},
    )

    assert resp.status_code == 422, resp.text
    [problem] = resp.json()["fields"]
    assert problem["field"] == "endpoint"
    assert says in problem["message"]
    # Refused by their text alone: nothing was looked up.
    assert dns.asked == []


@pytest.mark.parametrize(
    ("records", "says"),
    [
        ({"push.example.net": ["127.0.0.1"]}, "resolves to 127.0.0.1"),
        ({"push.example.net": ["93.184.216.34", "10.0.0.7"]}, "resolves to 10.0.0.7"),
        ({"push.example.net": ["fd00::1"]}, "resolves to fd00::1"),
        ({"push.example.net": ["169.254.169.254"]}, "resolves to 169.254"),
        ({"push.example.net": ["::ffff:192.168.0.1"]}, "resolves to ::ffff:"),
        ({"push.example.net": ["0.0.0.0"]}, "resolves to 0.0.0.0"),
        ({"push.example.net": ["224.0.0.1"]}, "resolves to 224.0.0.1"),
        ({"push.example.net": ["192.0.0.8"]}, "resolves to 192.0.0.8"),
        ({"push.example.net": ["192.88.99.1"]}, "resolves to 192.88.99.1"),
        ({"push.example.net": ["3fff::1"]}, "resolves to 3fff::1"),
        ({"push.example.net": ["2001:2::1"]}, "resolves to 2001:2::1"),
        ({}, "does not resolve"),
    ],
)
@pytest.mark.integration
async def test_a_name_that_resolves_to_a_non_public_address_is_refused(
    settings: Settings,
    demo: Demo,
    dns: FakeDNS,
    dns_api: httpx.AsyncClient,
    records: dict[str, list[str]],
    says: str,
) -> None:
    dns.records.update(records)

    resp = await dns_api.post(
        "/push/subscriptions",
        json=_with(endpoint="https://push.example.net/x"),
        headers=auth(settings, demo.bob),
    )

    assert resp.status_code == 422, resp.text
    [problem] = resp.json()["fields"]
    assert problem["field"] == "endpoint"
    assert says in problem["message"]
    assert dns.asked == ["push.example.net"]


@pytest.mark.integration
async def test_a_name_that_never_resolves_is_refused_in_time(
    settings: Settings, demo: Demo, dns: FakeDNS, dns_api: httpx.AsyncClient
) -> None:
    dns.slow.add("push.example.net")

    resp = await dns_api.post(
        "/push/subscriptions",
        json=_with(endpoint="https://push.example.net/x"),
        headers=auth(settings, demo.bob),
    )

    assert resp.status_code == 422, resp.text
    assert "did not resolve within 0.5s" in resp.json()["fields"][0]["message"]


@pytest.mark.parametrize(
    "addresses",
    [
        ["93.184.216.34", "2606:2800:220:1::1"],
        # The globally reachable exceptions inside the IETF protocol assignment
        # blocks (192.0.0.0/24, 2001::/23) of the IANA special-purpose registries.
        ["192.0.0.9"],
        ["192.0.0.10"],
        ["2001:1::1", "2001:1::2"],
        ["2001:3::1", "2001:4:112::1", "2001:20::1", "2001:30::1"],
    ],
)
@pytest.mark.integration
async def test_a_name_with_only_public_addresses_is_accepted(
    settings: Settings,
    demo: Demo,
    dns: FakeDNS,
    dns_api: httpx.AsyncClient,
    addresses: list[str],
) -> None:
    dns.records["push.example.net"] = addresses

    resp = await dns_api.post(
        "/push/subscriptions",
        json=_with(endpoint="https://push.example.net:443/x"),
        headers=auth(settings, demo.bob),
    )

    assert resp.status_code == 201, resp.text


@pytest.mark.parametrize("subscription_id", ["0", "-1", str(MAX_ID + 1)])
async def test_a_subscription_id_no_bigint_can_hold_is_refused_naming_it(
    strict_api: httpx.AsyncClient, subscription_id: str
) -> None:
    token = issue_token(1, "bob", Settings())

    resp = await strict_api.delete(
        f"/push/subscriptions/{subscription_id}",
        headers={"Authorization": f"Bearer {token}"},
    )

    assert resp.status_code == 422, resp.text
    assert resp.json()["fields"][0]["field"] == "subscription_id"


async def test_a_nul_in_the_user_agent_is_refused_naming_the_header(
    strict_api: httpx.AsyncClient,
) -> None:
    token = issue_token(1, "bob", Settings())

    resp = await strict_api.post(
        "/push/subscriptions",
        json=GOOD,
        headers={"Authorization": f"Bearer {token}", "User-Agent": "Bad\x00Agent"},
    )

    assert resp.status_code == 422, resp.text
    assert resp.json()["fields"][0]["field"] == "user-agent"


@pytest.mark.integration
async def test_a_token_naming_a_user_id_beyond_bigint_is_unauthorized(
    settings: Settings, demo: Demo, api: httpx.AsyncClient
) -> None:
    headers = auth(settings, int("9" * 23))

    listed = await api.get("/push/subscriptions", headers=headers)
    added = await api.post("/push/subscriptions", json=GOOD, headers=headers)
    removed = await api.delete("/push/subscriptions/1", headers=headers)

    assert [listed.status_code, added.status_code, removed.status_code] == [401] * 3


@pytest.mark.integration
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{{"endpoint": "{e}", "endpoint": "{e}", "keys": {k}}}', "endpoint"),
        ('{{"endpoint": "{e}", "keys": {k}, "keys": {k}}}', "keys"),
        (
            '{{"endpoint": "{e}", "keys": {{"p256dh": "{p}", "auth": "{a}", '
            '"auth": "{a}"}}}}',
            "keys.auth",
        ),
    ],
    ids=["endpoint", "keys", "keys.auth"],
)
async def test_a_subscription_that_repeats_a_key_is_refused_and_stores_nothing(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
    body: str,
    field: str,
) -> None:
    device = push_service.device().subscription()
    keys = device["keys"]
    content = body.format(
        e=device["endpoint"], k=json.dumps(keys), p=keys["p256dh"], a=keys["auth"]
    )

    resp = await api.post(
        "/push/subscriptions",
        content=content,
        headers={**auth(settings, demo.bob), "Content-Type": "application/json"},
    )

    assert resp.status_code == 422, resp.text
    assert resp.json()["fields"] == [
        {"field": field, "message": "key given more than once"}
    ]
    assert await db.fetchval("SELECT count(*) FROM push_subscriptions") == 0


@pytest.mark.integration
async def test_a_subscription_id_not_written_in_canonical_decimal_removes_nothing(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
) -> None:
    bob = auth(settings, demo.bob)
    mine = await subscribed(api, push_service, bob)

    answers = [
        await api.delete(f"/push/subscriptions/{spelling}", headers=bob)
        for spelling in other_spellings(mine)
    ]
    kept = await api.get("/push/subscriptions", headers=bob)

    for spelling, resp in zip(other_spellings(mine), answers, strict=True):
        assert resp.status_code == 422, (spelling, resp.text)
        fields = [f["field"] for f in resp.json()["fields"]]
        assert fields == ["subscription_id"], spelling
    assert [s["id"] for s in kept.json()] == [mine]


@pytest.mark.integration
async def test_a_token_for_a_user_who_does_not_exist_is_401_and_changes_nothing(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    device = push_service.device().subscription()
    bobs = await api.post(
        "/push/subscriptions", json=device, headers=auth(settings, demo.bob)
    )
    ghost_id = demo.dave + 1000
    ghost = auth(settings, ghost_id)

    listed = await api.get("/push/subscriptions", headers=ghost)
    # Bob's browser, which a subscription for another user would move.
    taken = await api.post("/push/subscriptions", json=device, headers=ghost)
    fresh = await api.post(
        "/push/subscriptions", json=push_service.device().subscription(), headers=ghost
    )
    removed = await api.delete(
        f"/push/subscriptions/{bobs.json()['id']}", headers=ghost
    )
    missing = await api.delete("/push/subscriptions/999999", headers=ghost)

    answers = [listed, taken, fresh, removed, missing]
    assert [r.status_code for r in answers] == [401] * 5
    for resp in answers:
        assert resp.headers["www-authenticate"] == "Bearer"
        assert resp.json() == {
            "error": "unauthorized",
            "detail": f"the token names user {ghost_id}, who does not exist",
        }
    stored = await db.fetch("SELECT id, user_id FROM push_subscriptions")
    assert [tuple(r) for r in stored] == [(bobs.json()["id"], demo.bob)]


@pytest.mark.integration
async def test_a_token_for_a_user_who_does_not_exist_resolves_no_endpoint_host(
    settings: Settings,
    demo: Demo,
    dns: FakeDNS,
    dns_api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    dns.records["push.example.net"] = ["93.184.216.34"]
    ghost_id = demo.dave + 1000

    resp = await dns_api.post(
        "/push/subscriptions",
        json=_with(endpoint="https://push.example.net/x"),
        headers=auth(settings, ghost_id),
    )

    assert resp.status_code == 401, resp.text
    assert resp.headers["www-authenticate"] == "Bearer"
    assert resp.json() == {
        "error": "unauthorized",
        "detail": f"the token names user {ghost_id}, who does not exist",
    }
    assert dns.asked == []
    assert await db.fetchval("SELECT count(*) FROM push_subscriptions") == 0


@pytest.mark.integration
async def test_a_user_deleted_while_the_endpoint_resolves_is_401_and_stores_nothing(
    settings: Settings,
    demo: Demo,
    dns: FakeDNS,
    dns_api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    erin = await db.fetchval(
        "INSERT INTO users (username, display_name) VALUES ('erin', 'Erin') "
        "RETURNING id"
    )
    dns.records["push.example.net"] = ["93.184.216.34"]
    dns.during_lookup = lambda: db.execute("DELETE FROM users WHERE id = $1", erin)

    resp = await dns_api.post(
        "/push/subscriptions",
        json=_with(endpoint="https://push.example.net/x"),
        headers=auth(settings, erin),
    )

    assert resp.status_code == 401, resp.text
    assert resp.json() == {
        "error": "unauthorized",
        "detail": f"the token names user {erin}, who does not exist",
    }
    assert dns.asked == ["push.example.net"]
    assert await db.fetchval("SELECT count(*) FROM push_subscriptions") == 0


@pytest.mark.integration
async def test_a_user_without_subscriptions_lists_none(
    settings: Settings, demo: Demo, api: httpx.AsyncClient
) -> None:
    resp = await api.get("/push/subscriptions", headers=auth(settings, demo.carol))

    assert resp.status_code == 200
    assert resp.json() == []


@pytest.mark.integration
async def test_a_subscription_sent_with_two_authorization_headers_stores_nothing(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    bob = auth(settings, demo.bob)["Authorization"]
    carol = auth(settings, demo.carol)["Authorization"]
    twice = [("Authorization", bob), ("Authorization", carol)]

    created = await api.post(
        "/push/subscriptions", json=push_service.device().subscription(), headers=twice
    )
    listed = await api.get("/push/subscriptions", headers=twice)
    removed = await api.delete("/push/subscriptions/1", headers=twice)

    for resp in (created, listed, removed):
        assert resp.status_code == 422, resp.text
        assert [f["field"] for f in resp.json()["fields"]] == ["authorization"]
    assert await db.fetchval("SELECT count(*) FROM push_subscriptions") == 0


@pytest.mark.integration
async def test_a_method_the_subscriptions_do_not_take_is_405_listing_those_they_do(
    settings: Settings, demo: Demo, api: httpx.AsyncClient
) -> None:
    answer = await api.put(
        "/push/subscriptions", json={}, headers=auth(settings, demo.bob)
    )

    assert answer.status_code == 405, answer.text
    assert answer.json()["error"] == "method_not_allowed"
    assert answer.headers["allow"] == "GET, HEAD, POST"
