"""A mention becomes a Web Push: comments, dispatcher and push sender as processes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from contracts.auth import issue_token
from contracts.settings import Settings
from push_sender.worker import NO_SUBSCRIPTION
from tests.push.conftest import VapidPair
from tests.support.data import Demo
from tests.support.processes import Service
from tests.support.push_service import PushService
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

SERVICES = ("comments", "dispatcher", "push-sender")


@pytest.fixture
async def platform(
    settings: Settings, vapid_pair: VapidPair, tmp_path: Path
) -> AsyncIterator[dict[str, Service]]:
    env = {
        "NOTIFLOW_ENV": "test",
        "NOTIFLOW_DATABASE_URL": settings.database_url,
        "NOTIFLOW_AMQP_URL": settings.amqp_url,
        "NOTIFLOW_OUTBOX_SWEEP_SECONDS": "0.5",
        "NOTIFLOW_VAPID_PRIVATE_KEY": vapid_pair.pem,
        "NOTIFLOW_VAPID_SUBJECT": "mailto:ops@example.com",
        "NOTIFLOW_PUSH_ALLOWED_HOSTS": "127.0.0.1",
    }
    services = {name: Service(name, env, tmp_path).start() for name in SERVICES}
    try:
        for service in services.values():
            service.wait_ready()
        yield services
    finally:
        for service in services.values():
            service.stop()


async def test_a_mention_pushes_to_the_subscribed_and_skips_the_rest(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    platform: dict[str, Service],
) -> None:
    bob, carol = (
        issue_token(u, n, settings)
        for u, n in ((demo.bob, "bob"), (demo.carol, "carol"))
    )
    phone = push_service.device()
    async with httpx.AsyncClient(base_url=platform["push-sender"].url) as push:
        key = await push.get("/push/vapid-public-key")
        subscribed = await push.post(
            "/push/subscriptions",
            json=phone.subscription(),
            headers={"Authorization": f"Bearer {bob}"},
        )
    assert key.json()["public_key"] == push_service.vapid_public_key
    assert subscribed.status_code == 201, subscribed.text

    async with httpx.AsyncClient(base_url=platform["comments"].url) as api:
        resp = await api.post(
            "/comments",
            json={"post_id": demo.post, "body": "@bob and @dave, look"},
            headers={"Authorization": f"Bearer {carol}"},
        )
    assert resp.status_code == 201, resp.text

    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await eventually(lambda: _push_rows_settled(conn), what="push rows")
    finally:
        await conn.close()
    by_user = {r["user_id"]: r for r in rows}
    assert set(by_user) == {demo.bob, demo.dave}
    assert by_user[demo.bob]["status"] == "sent"
    assert by_user[demo.dave]["status"] == "skipped"
    assert by_user[demo.dave]["last_error"] == NO_SUBSCRIPTION

    [got] = phone.received
    assert push_service.problems == []
    assert got.payload["notification_id"] == by_user[demo.bob]["id"]
    assert "mentioned you" in got.payload["title"]
    assert "@bob and @dave, look" in got.payload["body"]
    assert got.payload["url"].endswith(f"?post={demo.post}#comment-{resp.json()['id']}")
    assert got.headers["urgency"] == "high"
    assert got.headers["topic"] == f"post-{demo.post}"


async def _push_rows_settled(conn: asyncpg.Connection) -> list[asyncpg.Record] | None:
    rows = await conn.fetch(
        "SELECT id, user_id, status, last_error FROM notifications WHERE type = 'push'"
    )
    if len(rows) == 2 and all(r["status"] in ("sent", "skipped") for r in rows):
        return rows
    return None
