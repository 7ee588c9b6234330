"""Live streams across replicas and tabs, and what each stream lets through.

Every gateway here is a real process; deliveries go through RabbitMQ, so any
replica may consume one, and PostgreSQL NOTIFY carries it to the others.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable

import aio_pika
import httpx
import pytest

from contracts import topology
from contracts.messages import DeliveryRequested
from contracts.settings import Settings
from tests.sse import helpers
from tests.sse.conftest import StartGateway
from tests.support.data import Demo
from tests.support.processes import Service
from tests.support.sse import SSEClient
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


async def publish_deliveries(
    amqp_url: str, deliveries: list[DeliveryRequested]
) -> None:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.DELIVERIES_EXCHANGE)
        for delivery in deliveries:
            await exchange.publish(
                aio_pika.Message(
                    delivery.to_bytes(),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=f"delivery-{delivery.notification_id}",
                ),
                routing_key="sse",
                timeout=10,
            )


async def pending(
    settings: Settings, user_id: int, count: int
) -> list[DeliveryRequested]:
    out = []
    async with helpers.database(settings.database_url) as pg:
        for i in range(count):
            nid = await helpers.add(pg, user_id, f"note {i}")
            row = await pg.fetchrow(
                "SELECT event_id, event_occurred_at FROM notifications WHERE id = $1",
                nid,
            )
            out.append(
                DeliveryRequested(
                    notification_id=nid,
                    event_id=row["event_id"],
                    user_id=user_id,
                    type="sse",
                    channel="comment.mention",
                    priority=0,
                    event_occurred_at=row["event_occurred_at"],
                )
            )
    return out


async def test_every_tab_on_every_replica_gets_each_notification_once(
    settings: Settings,
    start_gateway: StartGateway,
    demo: Demo,
    token: Callable[..., str],
) -> None:
    replicas = [start_gateway(), start_gateway()]
    bob = token(demo.bob)
    tabs = [SSEClient(f"{gw.url}/sse?token={bob}") for gw in replicas for _ in range(2)]
    alice_tab = SSEClient(f"{replicas[0].url}/sse?token={token(demo.alice)}")
    for tab in [*tabs, alice_tab]:
        await tab.__aenter__()
    try:
        deliveries = await pending(settings, demo.bob, 20)
        await publish_deliveries(settings.amqp_url, deliveries)
        for tab in tabs:
            await tab.wait_for("notification", 20)
        consumed = await eventually(
            lambda: _consumers(replicas),
            what="each replica wrote every event to both its tabs",
        )
    finally:
        for tab in [*tabs, alice_tab]:
            await tab.__aexit__(None, None, None)

    expected = [d.notification_id for d in deliveries]
    for tab in tabs:
        assert Counter(tab.ids()) == Counter(expected), "missing or repeated events"
    assert alice_tab.ids() == []
    assert consumed


async def _consumers(replicas: list[Service]) -> bool:
    # Each replica counts the events it wrote; both wrote 40 (two tabs, 20 each).
    written = [
        (await helpers.gauges(gw.url)).get("notiflow_sse_events_written_total", 0)
        for gw in replicas
    ]
    return written == [40.0, 40.0]


async def test_a_user_never_sees_anothers_stream_or_inbox(
    settings: Settings, gateway: Service, demo: Demo, token: Callable[..., str]
) -> None:
    async with helpers.database(settings.database_url) as pg:
        alices = await helpers.add_and_deliver(pg, demo.alice, "private to alice")
        async with (
            SSEClient(f"{gateway.url}/sse?token={token(demo.bob)}") as bob_stream,
            SSEClient(f"{gateway.url}/sse?token={token(demo.alice)}") as alice_stream,
        ):
            for_alice = await helpers.add_and_deliver(pg, demo.alice, "also alice")
            for_bob = await helpers.add_and_deliver(pg, demo.bob, "for bob")
            await bob_stream.wait_for("notification")
            await alice_stream.wait_for("notification")
    assert bob_stream.ids() == [for_bob]
    assert alice_stream.ids() == [for_alice]

    bob = {"Authorization": f"Bearer {token(demo.bob)}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=bob) as client:
        listed = (await client.get("/inbox")).json()
        read = await client.post(f"/inbox/{alices}/read")
        archived = await client.post(f"/inbox/{alices}/archive")
    assert [item["id"] for item in listed["items"]] == [for_bob]
    assert read.status_code == 404 and archived.status_code == 404
    async with helpers.database(settings.database_url) as pg:
        state = await pg.fetchrow(
            "SELECT read_at, archived_at FROM notifications WHERE id = $1", alices
        )
    assert state["read_at"] is None and state["archived_at"] is None


@pytest.mark.parametrize("path", ["/sse", "/inbox", "/inbox/unread-count"])
async def test_missing_forged_or_expired_tokens_get_401(
    settings: Settings,
    gateway: Service,
    demo: Demo,
    token: Callable[..., str],
    path: str,
) -> None:
    expired = token(demo.bob, ttl=-60)
    forged = token(demo.bob)[:-4] + "AAAA"
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
        answers = [
            await client.get(path),
            await client.get(path, params={"token": expired}),
            await client.get(path, headers={"Authorization": f"Bearer {expired}"}),
            await client.get(path, params={"token": forged}),
        ]
    assert [a.status_code for a in answers] == [401] * 4
    assert answers[1].json() == {"error": "unauthorized", "detail": "token has expired"}
    assert answers[1].headers["www-authenticate"] == "Bearer"


async def test_a_stream_ends_when_its_token_expires(
    gateway: Service, demo: Demo, token: Callable[..., str]
) -> None:
    short = token(demo.bob, ttl=2)
    async with SSEClient(f"{gateway.url}/sse?token={short}") as live:
        await asyncio.wait_for(live.ended.wait(), timeout=10)
    async with SSEClient(f"{gateway.url}/sse?token={short}") as again:
        await asyncio.wait_for(again.ended.wait(), timeout=10)
    assert again.status == 401


async def test_tokens_in_query_strings_never_reach_the_log(
    settings: Settings, gateway: Service, demo: Demo, token: Callable[..., str]
) -> None:
    good, expired = token(demo.bob), token(demo.bob, ttl=-5)
    async with SSEClient(f"{gateway.url}/sse?token={good}") as live:
        async with helpers.database(settings.database_url) as pg:
            await helpers.add_and_deliver(pg, demo.bob, "logged?")
        await live.wait_for("notification")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
        await client.get("/sse", params={"token": expired})
        await client.get("/inbox", params={"token": good, "limit": "0"})
        await client.get("/inbox/x/read", params={"token": good})
    gateway.stop()
    log = gateway.log_path.read_text()
    for secret in (good, expired, good.split(".")[2], expired.split(".")[2]):
        assert secret not in log


async def test_stream_is_proxy_friendly_and_beats_while_idle(
    settings: Settings,
    start_gateway: StartGateway,
    demo: Demo,
    token: Callable[..., str],
) -> None:
    gateway = start_gateway(
        NOTIFLOW_SSE_HEARTBEAT_SECONDS="0.3", NOTIFLOW_SSE_RETRY_MS="1500"
    )
    async with SSEClient(f"{gateway.url}/sse?token={token(demo.bob)}") as live:
        await live.wait_comment("ping")
    headers = live.response_headers
    assert headers is not None
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert live.retry == 1500


def test_heartbeat_setting_refuses_more_than_fifteen_seconds() -> None:
    from pydantic import ValidationError

    from sse_gateway.app import GatewaySettings

    with pytest.raises(ValidationError, match="sse_heartbeat_seconds"):
        GatewaySettings(sse_heartbeat_seconds=30)


async def test_configured_origins_may_call_the_gateway(
    start_gateway: StartGateway, demo: Demo, token: Callable[..., str]
) -> None:
    gateway = start_gateway(NOTIFLOW_CORS_ORIGINS="https://app.example")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
        allowed = await client.options(
            "/inbox",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        other = await client.get(
            "/inbox/unread-count",
            headers={
                "Origin": "https://evil.example",
                "Authorization": f"Bearer {token(demo.bob)}",
            },
        )
        url = f"{gateway.url}/sse?token={token(demo.bob)}"
        stream = SSEClient(url, headers={"Origin": "https://app.example"})
        async with stream:
            pass
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers
    assert stream.response_headers is not None
    cors = stream.response_headers["access-control-allow-origin"]
    assert cors == "https://app.example"


async def test_streams_catch_up_after_the_listen_connection_is_lost(
    settings: Settings, gateway: Service, demo: Demo, token: Callable[..., str]
) -> None:
    async with (
        SSEClient(f"{gateway.url}/sse?token={token(demo.bob)}") as live,
        helpers.database(settings.database_url) as pg,
    ):
        before = await helpers.add_and_deliver(pg, demo.bob, "before")
        await live.wait_for("notification")
        cut = await pg.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
        )
        during = [
            await helpers.add_and_deliver(pg, demo.bob, f"d{i}") for i in range(3)
        ]
        # Re-listening tells every stream to re-read the inbox and the count.
        await live.wait_for("sync")
        await live.wait_for("notification", 4)
        after = await helpers.add_and_deliver(pg, demo.bob, "after")
        await live.wait_for("notification", 5)
    assert cut == 1
    assert live.ids() == [before, *during, after]
    # And the operator is told.
    assert "inbox LISTEN connection closed by the database" in gateway.log()


async def test_shutdown_ends_open_streams_and_the_process_exits(
    gateway: Service, demo: Demo, token: Callable[..., str]
) -> None:
    streams = [
        SSEClient(f"{gateway.url}/sse?token={token(demo.bob)}") for _ in range(5)
    ]
    for live in streams:
        await live.__aenter__()
    try:
        started = time.monotonic()
        code = await asyncio.to_thread(gateway.stop)
        for live in streams:
            await asyncio.wait_for(live.ended.wait(), timeout=5)
    finally:
        for live in streams:
            await live.__aexit__(None, None, None)
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
    assert code in (0, -signal.SIGTERM)
    # Drain ends streams at once instead of waiting out uvicorn's graceful timeout.
    assert time.monotonic() - started < 3
