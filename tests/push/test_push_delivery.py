"""Push deliveries through RabbitMQ and PostgreSQL to a stand-in push service."""

from __future__ import annotations

import asyncio
import logging
import os
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI

from contracts import topology
from contracts.auth import issue_token
from contracts.settings import Settings
from push_sender import payload, transport
from push_sender.app import create_app
from push_sender.settings import PushSettings
from push_sender.vapid import b64url, public_point
from push_sender.worker import ALL_GONE, NO_SUBSCRIPTION
from tests.integration import helpers
from tests.integration.conftest import through
from tests.integration.proxy import Proxy
from tests.push.conftest import (
    FakeDNS,
    deliver_together,
    notify,
    redeliver,
    settled,
)
from tests.support import infra
from tests.support.data import Demo
from tests.support.push_service import Answer, Device, PushService
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

VAPID_OF_SOMEONE_ELSE = b64url(
    public_point(ec.generate_private_key(ec.SECP256R1()).public_key())
)


async def subscribe(
    api: httpx.AsyncClient, settings: Settings, user_id: int, device: Device
) -> int:
    token = issue_token(user_id, "someone", settings)
    resp = await api.post(
        "/push/subscriptions",
        json=device.subscription(),
        headers={"Authorization": f"Bearer {token}", "User-Agent": "test-browser"},
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


async def retrying(db: asyncpg.Connection, row_id: int) -> asyncpg.Record:
    """The row once its first attempt has set it ``retrying``."""
    return await eventually(
        lambda: db.fetchrow(
            "SELECT attempts, next_attempt_at, last_error FROM notifications "
            "WHERE id = $1 AND status = 'retrying'",
            row_id,
        ),
        what="row retrying",
        interval=0.02,
    )


async def test_every_device_gets_the_decrypted_payload_and_the_headers(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    phone, laptop = push_service.device(), push_service.device()
    ids = [await subscribe(api, settings, demo.bob, d) for d in (phone, laptop)]

    row_id = await notify(settings, db, demo.bob, priority=7, post_id=42)

    row = await eventually(lambda: settled(db, row_id), what="row settled")
    assert push_service.problems == []
    assert row["status"] == "sent" and row["attempts"] == 1
    for device in (phone, laptop):
        [got] = device.received
        assert got.payload == {
            "title": "Carol mentioned you",
            "body": "Have a look, @bob.",
            "url": "http://page/?post=42#comment-1",
            "notification_id": row_id,
        }
        assert got.headers["ttl"] == "3600"
        assert got.headers["urgency"] == "high"
        assert got.headers["topic"] == "post-42"
        # What answers is the subscriber's to choose: nothing compressed, please.
        assert got.headers["accept-encoding"] == "identity"
    devices = row["metadata"]["push"]
    assert {devices[str(i)]["outcome"] for i in ids} == {"sent"}
    touched = await db.fetchval(
        "SELECT count(*) FROM push_subscriptions WHERE last_success_at IS NOT NULL"
    )
    assert touched == 2


async def test_a_push_stored_after_push_was_turned_off_is_skipped_unsent(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    # The dispatcher read the preference just before the user turned push off,
    # so the row was stored all the same; the sender looks again when it takes it.
    phone = push_service.device()
    await subscribe(api, settings, demo.bob, phone)
    await db.execute(
        "INSERT INTO notification_preferences (user_id, type, enabled) "
        "VALUES ($1, 'push', false)",
        demo.bob,
    )

    row_id = await notify(settings, db, demo.bob)

    row = await eventually(lambda: settled(db, row_id), what="row settled")
    assert (row["status"], row["attempts"]) == ("skipped", 0)
    assert row["last_error"] == "push disabled by preference"
    assert phone.received == []


async def test_urgency_follows_the_channel_priority(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    device = push_service.device()
    await subscribe(api, settings, demo.bob, device)

    for priority in (4, 2):
        row_id = await notify(settings, db, demo.bob, priority=priority)
        await eventually(lambda rid=row_id: settled(db, rid), what="row settled")

    assert [r.headers["urgency"] for r in device.received] == ["normal", "low"]


async def test_a_gone_device_is_deleted_and_never_retried(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    gone = push_service.device(Answer(410))
    await subscribe(api, settings, demo.bob, gone)

    row_id = await notify(settings, db, demo.bob)

    row = await eventually(lambda: settled(db, row_id), what="row settled")
    assert row["status"] == "skipped" and row["last_error"] == ALL_GONE
    assert row["attempts"] == 1 and row["next_attempt_at"] is None
    assert len(gone.received) == 1
    assert await db.fetchval("SELECT count(*) FROM push_subscriptions") == 0


async def test_one_accepting_device_is_enough_and_the_dead_one_goes(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    gone, alive = push_service.device(Answer(404)), push_service.device()
    gone_id = await subscribe(api, settings, demo.bob, gone)
    alive_id = await subscribe(api, settings, demo.bob, alive)

    row_id = await notify(settings, db, demo.bob)

    row = await eventually(lambda: settled(db, row_id), what="row settled")
    assert row["status"] == "sent"
    outcomes = row["metadata"]["push"]
    assert outcomes[str(gone_id)]["outcome"] == "gone"
    assert outcomes[str(gone_id)]["status"] == 404
    assert outcomes[str(alive_id)]["outcome"] == "sent"
    left = await db.fetch("SELECT id FROM push_subscriptions")
    assert [r["id"] for r in left] == [alive_id]


async def test_429_retries_no_sooner_than_retry_after(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    # The first retry delay is 1 s; the push service asks for 2.
    busy = push_service.device(Answer(429, {"Retry-After": "2"}))
    await subscribe(api, settings, demo.bob, busy)

    row_id = await notify(settings, db, demo.bob)

    waiting = await retrying(db, row_id)
    first = busy.received[0]
    assert waiting["attempts"] == 1
    assert "429" in waiting["last_error"]
    assert waiting["next_attempt_at"].timestamp() >= first.at + 2

    row = await eventually(lambda: settled(db, row_id), what="row settled")
    assert row["status"] == "sent" and row["attempts"] == 2
    second = busy.received[1]
    assert second.at - first.at >= 2
    assert second.payload == first.payload


async def test_a_retry_after_between_two_delays_is_due_when_its_message_returns(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    push_settings: PushSettings,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Asked to wait 3 s, the message goes to the 8 s retry queue. The row must
    # be due when it comes back: due sooner, the sweeper would take the message
    # for lost more than a lease (2.5 s) before that, and push again early.
    busy = push_service.device(Answer(429, {"Retry-After": "3"}))
    update = {
        "retry_delays": "1,8",
        "push_timeout": 1.0,
        "push_lease_seconds": 2.5,
    }
    app = create_app(push_settings.model_copy(update=update))
    async with asyncio.timeout(60), app.router.lifespan_context(app):
        own = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=own, base_url="http://p") as api:
            await subscribe(api, settings, demo.bob, busy)
        row_id = await notify(settings, db, demo.bob)
        waiting = await retrying(db, row_id)
        row = await eventually(
            lambda: settled(db, row_id), what="row settled", timeout=30
        )

    first, second = busy.received
    assert waiting["next_attempt_at"].timestamp() >= first.at + 8 - 0.5
    assert second.at - first.at >= 8 - 0.5
    assert row["status"] == "sent" and row["attempts"] == 2
    recovered = [
        r for r in caplog.records if getattr(r, "action", None) == "delivery.recovered"
    ]
    assert recovered == []


async def test_server_errors_retry_until_the_attempts_run_out(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    broken = push_service.device(*[Answer(500)] * 3)
    await subscribe(api, settings, demo.bob, broken)

    row_id = await notify(settings, db, demo.bob)

    row = await eventually(lambda: settled(db, row_id), what="row settled")
    assert row["status"] == "failed" and row["attempts"] == 3
    assert row["last_error"].startswith("gave up after 3 attempts")
    assert [r.status for r in broken.received] == [500, 500, 500]


async def test_413_shortens_the_body_and_sends_once_more(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    picky = push_service.device(Answer(413))
    await subscribe(api, settings, demo.bob, picky)
    long_text = "Zoë 🚀 wrote a very long comment. " * 150

    row_id = await notify(settings, db, demo.bob, message=long_text)

    row = await eventually(lambda: settled(db, row_id), what="row settled")
    assert row["status"] == "sent" and row["attempts"] == 1
    refused, accepted = picky.received
    assert refused.status == 413 and accepted.status == 201
    assert accepted.size < refused.size
    body = accepted.payload["body"]
    assert body.endswith("…") and long_text.startswith(body[:-1])
    assert len(payload.encode(accepted.payload)) <= payload.FALLBACK_PLAINTEXT


async def test_a_user_without_subscription_is_skipped(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    push_app: object,
    db: asyncpg.Connection,
) -> None:
    row_id = await notify(settings, db, demo.alice)

    row = await eventually(lambda: settled(db, row_id), what="row settled")
    assert row["status"] == "skipped" and row["last_error"] == NO_SUBSCRIPTION
    assert row["attempts"] == 1


async def test_a_redelivered_message_never_pushes_twice(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="push_sender.worker")
    device = push_service.device()
    await subscribe(api, settings, demo.bob, device)
    row_id = await notify(settings, db, demo.bob)
    await eventually(lambda: settled(db, row_id), what="row settled")

    await redeliver(settings, db, row_id)

    await eventually(
        lambda: _logged(caplog, "push.skipped_duplicate"), what="repeat acked"
    )
    assert len(device.received) == 1


async def _logged(caplog: pytest.LogCaptureFixture, action: str) -> bool:
    return any(getattr(r, "action", None) == action for r in caplog.records)


async def test_a_retry_after_beyond_every_delay_parks_without_an_attempt(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    # The longest retry delay is 2 s: the message is parked twice for one attempt.
    busy = push_service.device(Answer(503, {"Retry-After": "3"}))
    await subscribe(api, settings, demo.bob, busy)

    row_id = await notify(settings, db, demo.bob)

    row = await eventually(lambda: settled(db, row_id), what="row settled")
    assert row["status"] == "sent" and row["attempts"] == 2
    first, second = busy.received
    assert second.at - first.at >= 3


async def test_a_push_signed_with_another_key_is_refused(
    settings: Settings,
    demo: Demo,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    async with PushService(vapid_public_key=VAPID_OF_SOMEONE_ELSE) as strict:
        device = strict.device()
        await subscribe(api, settings, demo.bob, device)

        row_id = await notify(settings, db, demo.bob)

        row = await eventually(lambda: settled(db, row_id), what="row settled")
    assert row["status"] == "failed" and "HTTP 401" in row["last_error"]
    assert strict.problems and "not the expected one" in strict.problems[0]
    assert device.delivered == []


async def test_a_row_whose_worker_died_is_pushed_by_the_sweeper(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    device = push_service.device()
    await subscribe(api, settings, demo.bob, device)
    row_id = await notify(settings, db, demo.bob)
    await eventually(lambda: settled(db, row_id), what="row settled")

    # As a worker killed between claim and outcome leaves it, without a message.
    await db.execute(
        "UPDATE notifications SET status = 'sending', sent_at = NULL, "
        "lease_expires_at = now() - interval '1 second' WHERE id = $1",
        row_id,
    )

    row = await eventually(lambda: settled(db, row_id), what="row settled again")
    assert row["status"] == "sent" and row["attempts"] == 2
    assert len(device.delivered) == 2


async def test_a_push_in_flight_when_the_broker_drops_the_consumer_is_sent_once(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    # The broker closes the push sender's consumer connection while a push waits
    # for its answer. The push must end recorded, at once rather than when its
    # lease runs out, and reach the device once, redelivery or not.
    device = push_service.device()
    await subscribe(api, settings, demo.bob, device)
    vhost = urlsplit(settings.amqp_url).path.lstrip("/")
    closed: list[int] = []

    async def drop_the_consumer() -> None:
        push_service.before_answer = None
        closed.append(
            await asyncio.to_thread(infra.close_connections, vhost, "consumers")
        )
        # Long enough for the client to learn of it before the answer comes.
        await asyncio.sleep(1.0)

    push_service.before_answer = drop_the_consumer
    row_id = await notify(settings, db, demo.bob)

    row = await eventually(lambda: settled(db, row_id), timeout=20, what="row settled")
    assert closed == [1]
    assert row["status"] == "sent" and row["attempts"] == 1

    async def redelivered_and_done() -> bool:
        depth = await helpers.depths(settings.amqp_url, topology.delivery_queue("push"))
        return set(depth.values()) == {0}

    await eventually(redelivered_and_done, what="the push queue empty")
    await asyncio.sleep(1.0)
    assert len(device.delivered) == 1
    assert (await settled(db, row_id))["attempts"] == 1


def _sender_with(
    monkeypatch: pytest.MonkeyPatch,
    push_settings: PushSettings,
    connections: int,
    **changes: object,
) -> FastAPI:
    """A push sender whose HTTP client holds ``connections`` connections, for
    users of one subscription each."""
    monkeypatch.setattr(transport, "POOL_CONNECTIONS", connections)
    return create_app(
        push_settings.model_copy(
            update={"push_max_subscriptions_per_user": 1, **changes}
        )
    )


async def _subscribe_through(
    app: FastAPI, settings: Settings, user_id: int, device: Device
) -> None:
    transport_ = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport_, base_url="http://push") as api:
        await subscribe(api, settings, user_id, device)


async def test_pushes_beyond_the_connections_wait_outside_their_timeout(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    push_settings: PushSettings,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Three times as many pushes as connections, each answered in 1 s, within its
    # 1.5 s. Had the later ones waited for a connection inside their time, they
    # would have timed out after reaching the service, and been pushed again.
    app = _sender_with(
        monkeypatch, push_settings, 4, push_timeout=1.5, push_lease_seconds=30
    )
    device = push_service.device()

    async def slowly() -> None:
        await asyncio.sleep(1.0)

    push_service.before_answer = slowly
    async with app.router.lifespan_context(app):
        await _subscribe_through(app, settings, demo.bob, device)
        rows = [await notify(settings, db, demo.bob) for _ in range(12)]
        for row_id in rows:
            await eventually(
                lambda r=row_id: settled(db, r), timeout=30, what=f"row {row_id}"
            )

    attempts = await db.fetch(
        "SELECT attempts FROM notifications WHERE id = ANY($1)", rows
    )
    assert [r["attempts"] for r in attempts] == [1] * 12
    pushed = [got.payload["notification_id"] for got in device.delivered]
    assert sorted(pushed) == sorted(rows)


async def test_a_stop_gives_back_the_deliveries_still_waiting_for_their_turn(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    push_settings: PushSettings,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ten deliveries in one message, two pushed at a time, each answered in 0.5 s;
    # the service stops while the first two are out. Those finish; the other eight
    # go back with the message, unclaimed, instead of being claimed and cut short
    # by the end of the drain (and pushed a second time when their lease ran out).
    app = _sender_with(monkeypatch, push_settings, 2, drain_seconds=5)
    device = push_service.device()
    answering = asyncio.Event()

    async def slowly() -> None:
        answering.set()
        await asyncio.sleep(0.5)

    push_service.before_answer = slowly
    async with app.router.lifespan_context(app):
        await _subscribe_through(app, settings, demo.bob, device)
        rows = [await notify(settings, db, demo.bob, publish=False) for _ in range(10)]
        await deliver_together(settings, db, rows)
        await asyncio.wait_for(answering.wait(), 20)

    statuses = dict(
        await db.fetch(
            "SELECT status, count(*) FROM notifications WHERE id = ANY($1) "
            "GROUP BY status",
            rows,
        )
    )
    assert statuses == {"sent": 2, "pending": 8}, statuses
    assert len(device.delivered) == 2
    queue = topology.delivery_queue("push")
    assert (await helpers.depths(settings.amqp_url, queue))[queue] == 1


async def test_a_push_accepted_while_the_database_is_away_is_recorded_once_it_is_back(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    push_settings: PushSettings,
    db: asyncpg.Connection,
) -> None:
    """The device has the push: left ``sending`` until its lease ran out, the row
    would be handed out again and pushed a second time."""
    device = push_service.device()
    target = urlsplit(settings.database_url)
    proxy = Proxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    away = asyncio.Event()

    async def database_goes() -> None:
        push_service.before_answer = None
        await proxy.cut()
        away.set()

    push_service.before_answer = database_goes
    update = {
        "database_url": through(settings, proxy),
        "push_lease_seconds": 8.0,
        "push_timeout": 2.0,
    }
    app = create_app(push_settings.model_copy(update=update))
    try:
        async with asyncio.timeout(60), app.router.lifespan_context(app):
            own = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=own, base_url="http://p") as api:
                await subscribe(api, settings, demo.bob, device)
            row_id = await notify(settings, db, demo.bob)
            await asyncio.wait_for(away.wait(), 20)
            await asyncio.sleep(2)  # the sender tries to record it while away
            while_away = await db.fetchval(
                "SELECT status FROM notifications WHERE id = $1", row_id
            )
            await proxy.start()
            row = await eventually(lambda: settled(db, row_id), what="row settled")
            # Past the lease: nothing hands the row out again.
            await asyncio.sleep(9)
            again = await settled(db, row_id)
    finally:
        await proxy.close()

    assert while_away == "sending"
    assert row["status"] == "sent" and row["attempts"] == 1
    assert again is not None and again["attempts"] == 1
    assert len(device.received) == 1


async def test_a_name_rebound_to_an_inside_address_is_refused_and_not_retried(
    settings: Settings,
    demo: Demo,
    dns: FakeDNS,
    dns_api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    # Public when the browser subscribes, loopback when the push goes out.
    dns.records["push.example.net"] = ["93.184.216.34"]
    browser = ec.generate_private_key(ec.SECP256R1())
    token = issue_token(demo.bob, "bob", settings)
    created = await dns_api.post(
        "/push/subscriptions",
        json={
            "endpoint": "https://push.example.net/rebound",
            "expirationTime": None,
            "keys": {
                "p256dh": b64url(public_point(browser.public_key())),
                "auth": b64url(os.urandom(16)),
            },
        },
        headers={"Authorization": f"Bearer {token}"},
    )
    assert created.status_code == 201, created.text
    dns.records["push.example.net"] = ["127.0.0.1"]

    row_id = await notify(settings, db, demo.bob)

    row = await eventually(lambda: settled(db, row_id), what="row settled")
    assert row["status"] == "failed" and row["attempts"] == 1
    device = row["metadata"]["push"][str(created.json()["id"])]
    assert device["outcome"] == "rejected" and device["status"] is None
    assert "resolves to 127.0.0.1" in device["detail"]
    assert dns.asked == ["push.example.net", "push.example.net"]


async def test_rows_delivered_together_are_each_pushed_once_and_settled_alone(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    bobs, alices = push_service.device(), push_service.device()
    await subscribe(api, settings, demo.bob, bobs)
    await subscribe(api, settings, demo.alice, alices)
    rows = [
        await notify(settings, db, user, title=f"For {user}", publish=False)
        for user in (demo.bob, demo.alice, demo.dave)
    ]

    await deliver_together(settings, db, rows)

    settled_rows = [
        await eventually(lambda r=r: settled(db, r), what=f"row {r} settled")
        for r in rows
    ]
    assert [r["status"] for r in settled_rows] == ["sent", "sent", "skipped"]
    assert [d.payload["title"] for d in bobs.received] == [f"For {demo.bob}"]
    assert [d.payload["title"] for d in alices.received] == [f"For {demo.alice}"]
    assert push_service.problems == []


async def test_the_push_sender_plans_its_statements_once_per_connection(
    push_app: FastAPI,
) -> None:
    async with push_app.state.runtime.db.acquire() as conn:
        mode = await conn.fetchval("SHOW plan_cache_mode")

    assert mode == "force_generic_plan"


class TestRetriesOfRowsDeliveredTogether:
    @pytest.fixture
    def push_settings(self, push_settings: PushSettings) -> PushSettings:
        return push_settings.model_copy(update={"retry_delays": "1,30"})

    async def test_a_failed_push_is_retried_on_time_while_another_is_still_answered(
        self,
        settings: Settings,
        demo: Demo,
        push_service: PushService,
        api: httpx.AsyncClient,
        db: asyncpg.Connection,
    ) -> None:
        slow = 8.0
        failing = push_service.device(Answer(500))
        answered_late = push_service.device(Answer(201, delay=slow))
        await subscribe(api, settings, demo.bob, failing)
        await subscribe(api, settings, demo.alice, answered_late)
        rows = [
            await notify(settings, db, user, publish=False)
            for user in (demo.bob, demo.alice)
        ]

        await deliver_together(settings, db, rows)

        bobs, alices = [
            await eventually(lambda r=r: settled(db, r), what=f"row {r}", timeout=30)
            for r in rows
        ]
        assert bobs["status"] == alices["status"] == "sent"
        _, second = failing.received
        # Its retry went out one second after its failure, not once the other
        # device of its message had answered.
        assert second.at < answered_late.received[0].at + slow
        assert bobs["attempts"] == 2


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (Answer(500, body=b"oops\x00bad\r\nthing"), "HTTP 500 oops bad thing"),
        (Answer(429, headers={"Retry-After": "\u00b2"}), "HTTP 429"),
    ],
)
async def test_an_odd_answer_is_recorded_and_the_other_device_pushed_once(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
    answer: Answer,
    detail: str,
) -> None:
    odd, fine = push_service.device(answer), push_service.device()
    odd_id = await subscribe(api, settings, demo.bob, odd)
    await subscribe(api, settings, demo.bob, fine)

    row_id = await notify(settings, db, demo.bob)

    row = await eventually(lambda: settled(db, row_id), what="row settled")
    assert row["status"] == "sent"
    assert row["metadata"]["push"][str(odd_id)]["detail"] == detail
    assert len(fine.delivered) == 1


async def test_a_push_taken_with_a_body_that_stalls_is_sent_once(
    settings: Settings,
    demo: Demo,
    push_service: PushService,
    push_settings: PushSettings,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = _sender_with(
        monkeypatch, push_settings, 4, push_timeout=1.0, push_lease_seconds=30
    )
    device = push_service.device(Answer(201, body=b"abc", stall=3.0))
    async with app.router.lifespan_context(app):
        await _subscribe_through(app, settings, demo.bob, device)
        row_id = await notify(settings, db, demo.bob)
        row = await eventually(lambda: settled(db, row_id), what="row settled")

    assert (row["status"], row["attempts"]) == ("sent", 1)
    assert len(device.received) == 1
