"""How many subscriptions a user keeps, and which ones are never pushed to."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from contracts.settings import Settings
from push_sender.app import create_app
from push_sender.settings import PushSettings
from push_sender.worker import ALL_GONE
from tests.push.conftest import auth, notify, settled
from tests.support.data import Demo
from tests.support.push_service import Device, PushService
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

LIMIT = 3


@pytest.fixture
async def limited_app(push_settings: PushSettings) -> AsyncIterator[FastAPI]:
    settings = push_settings.model_copy(
        update={"push_max_subscriptions_per_user": LIMIT}
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def limited(limited_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=limited_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://push") as c:
        yield c


async def subscribe(
    api: httpx.AsyncClient,
    settings: Settings,
    user_id: int,
    body: dict[str, Any],
) -> httpx.Response:
    return await api.post(
        "/push/subscriptions",
        content=json.dumps(body),
        headers={**auth(settings, user_id), "Content-Type": "application/json"},
    )


async def endpoints_of(
    api: httpx.AsyncClient, settings: Settings, user_id: int
) -> set[str]:
    listed = await api.get("/push/subscriptions", headers=auth(settings, user_id))
    assert listed.status_code == 200, listed.text
    return {s["endpoint"] for s in listed.json()}


async def test_a_new_browser_past_the_limit_replaces_the_least_recently_subscribed(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    limited: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="push_sender.api")
    first, second, third, fourth = (push_service.device() for _ in range(4))
    ids = {}
    for device in (first, second, third):
        created = await subscribe(limited, settings, demo.bob, device.subscription())
        assert created.status_code == 201, created.text
        ids[device.endpoint] = created.json()["id"]

    # The first browser posts its subscription again: a refresh, not a new one,
    # and now the most recent.
    refreshed = await subscribe(limited, settings, demo.bob, first.subscription())
    at_limit = await endpoints_of(limited, settings, demo.bob)
    added = await subscribe(limited, settings, demo.bob, fourth.subscription())
    after = await endpoints_of(limited, settings, demo.bob)

    assert refreshed.status_code == 201, refreshed.text
    assert at_limit == {first.endpoint, second.endpoint, third.endpoint}
    assert added.status_code == 201, added.text
    assert after == {first.endpoint, third.endpoint, fourth.endpoint}
    [logged] = [
        r
        for r in caplog.records
        if getattr(r, "action", None) == "push.subscription_replaced"
    ]
    assert f"replaces {ids[second.endpoint]}" in logged.getMessage()


async def test_another_users_subscriptions_do_not_count_toward_the_limit(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    limited: httpx.AsyncClient,
) -> None:
    bobs = [push_service.device() for _ in range(LIMIT)]
    carols = [push_service.device() for _ in range(LIMIT)]
    for device in bobs:
        await subscribe(limited, settings, demo.bob, device.subscription())
    for device in carols:
        await subscribe(limited, settings, demo.carol, device.subscription())

    # Carol signs in on one of Bob's browsers: it moves to her, replacing one of
    # hers, and Bob is left with the others.
    moved = await subscribe(limited, settings, demo.carol, bobs[0].subscription())

    assert moved.status_code == 201, moved.text
    assert await endpoints_of(limited, settings, demo.bob) == {
        d.endpoint for d in bobs[1:]
    }
    assert await endpoints_of(limited, settings, demo.carol) == {
        bobs[0].endpoint,
        carols[1].endpoint,
        carols[2].endpoint,
    }


async def test_two_new_browsers_subscribing_at_once_leave_the_user_at_the_limit(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    limited: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    for _ in range(LIMIT - 1):
        await subscribe(
            limited, settings, demo.bob, push_service.device().subscription()
        )
    # Holding Bob's row makes each subscription wait as late as it can (storing
    # a row checks that its user exists), so that both are under way together.
    blocker = await asyncpg.connect(settings.database_url)
    try:
        held = blocker.transaction()
        await held.start()
        await blocker.execute("SELECT FROM users WHERE id = $1 FOR UPDATE", demo.bob)
        both = asyncio.gather(
            *(
                subscribe(
                    limited, settings, demo.bob, push_service.device().subscription()
                )
                for _ in range(2)
            )
        )
        await eventually(
            lambda: _waiting(db, 2), what="both subscriptions waiting for a lock"
        )
        await held.rollback()
        answers = await both
    finally:
        await blocker.close()

    assert [r.status_code for r in answers] == [201, 201], [r.text for r in answers]
    stored = await db.fetchval(
        "SELECT count(*) FROM push_subscriptions WHERE user_id = $1", demo.bob
    )
    assert stored == LIMIT


async def _waiting(db: asyncpg.Connection, count: int) -> bool:
    waiting = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return waiting >= count


async def test_only_the_newest_subscriptions_up_to_the_limit_are_pushed_to(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    limited: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    # Stored before there was a limit, or before it was lowered.
    devices = [push_service.device() for _ in range(LIMIT + 2)]
    for age, device in zip(range(len(devices), 0, -1), devices, strict=True):
        await db.execute(
            "INSERT INTO push_subscriptions (user_id, endpoint, p256dh, auth, "
            "created_at) VALUES ($1, $2, $3, $4, now() - $5 * interval '1 hour')",
            demo.bob,
            device.endpoint,
            device.p256dh,
            device.subscription()["keys"]["auth"],
            age,
        )

    row_id = await notify(settings, db, demo.bob)

    row = await eventually(lambda: settled(db, row_id), what="row settled")
    assert row["status"] == "sent"
    assert [len(d.received) for d in devices] == [0, 0, 1, 1, 1]
    assert len(row["metadata"]["push"]) == LIMIT


@pytest.mark.parametrize(
    ("expiration", "says"),
    [
        ("1", "has passed"),
        ("0", "has passed"),
        ("{past}", "has passed"),
        ("Infinity", "or null"),
        ("1e300", "or null"),
        ('"{future}"', "valid number"),
        ('" {future} "', "valid number"),
        ('"1e13"', "valid number"),
        ("true", "valid number"),
        ("false", "valid number"),
        ("[{future}]", "valid number"),
    ],
)
async def test_a_subscription_that_expired_or_cannot_expire_is_refused_naming_it(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
    expiration: str,
    says: str,
) -> None:
    past = int((time.time() - 60) * 1000)
    future = int((time.time() + 86400) * 1000)
    given = expiration.format(past=past, future=future)
    body = json.dumps(push_service.device().subscription()).replace(
        '"expirationTime": null', f'"expirationTime": {given}'
    )

    resp = await api.post(
        "/push/subscriptions",
        content=body,
        headers={**auth(settings, demo.bob), "Content-Type": "application/json"},
    )

    assert resp.status_code == 422, resp.text
    assert [f["field"] for f in resp.json()["fields"]] == ["expirationTime"]
    assert says in resp.json()["fields"][0]["message"]
    assert await db.fetchval("SELECT count(*) FROM push_subscriptions") == 0


async def test_a_subscription_past_its_expiration_time_is_not_pushed_to_and_goes(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    phone, laptop = push_service.device(), push_service.device()
    in_an_hour = (time.time() + 3600) * 1000
    taken = await subscribe(
        api, settings, demo.bob, {**phone.subscription(), "expirationTime": in_an_hour}
    )
    await subscribe(api, settings, demo.bob, laptop.subscription())
    phone_id = taken.json()["id"]
    stored = await db.fetchval(
        "SELECT extract(epoch FROM expires_at) * 1000 FROM push_subscriptions "
        "WHERE id = $1",
        phone_id,
    )
    # The hour passes.
    await db.execute(
        "UPDATE push_subscriptions SET expires_at = now() - interval '1 second' "
        "WHERE id = $1",
        phone_id,
    )

    row_id = await notify(settings, db, demo.bob)

    row = await eventually(lambda: settled(db, row_id), what="row settled")
    assert taken.status_code == 201, taken.text
    assert float(stored) == pytest.approx(in_an_hour, abs=1)
    assert row["status"] == "sent"
    assert phone.received == [] and len(laptop.received) == 1
    outcome = row["metadata"]["push"][str(phone_id)]
    assert outcome["outcome"] == "gone" and "expired" in outcome["detail"]
    assert await endpoints_of(api, settings, demo.bob) == {laptop.endpoint}


async def test_a_user_whose_only_subscription_expired_is_skipped(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    phone = push_service.device()
    await subscribe(api, settings, demo.bob, phone.subscription())
    await db.execute("UPDATE push_subscriptions SET expires_at = now()")

    row_id = await notify(settings, db, demo.bob)

    row = await eventually(lambda: settled(db, row_id), what="row settled")
    assert row["status"] == "skipped" and row["last_error"] == ALL_GONE
    assert phone.received == []
    assert await db.fetchval("SELECT count(*) FROM push_subscriptions") == 0


@pytest.mark.parametrize("fragment", ["#x", "#"])
async def test_an_endpoint_with_a_fragment_is_refused_naming_it(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
    fragment: str,
) -> None:
    device: Device = push_service.device()
    body = {**device.subscription(), "endpoint": device.endpoint + fragment}

    resp = await subscribe(api, settings, demo.bob, body)

    assert resp.status_code == 422, resp.text
    [problem] = resp.json()["fields"]
    assert problem["field"] == "endpoint" and "fragment" in problem["message"]
    assert await db.fetchval("SELECT count(*) FROM push_subscriptions") == 0
