"""Every connection a service opens to PostgreSQL or RabbitMQ names the service, so
that an operator reading ``pg_stat_activity`` (or the server's log), RabbitMQ's web
UI or ``rabbitmqctl list_connections client_properties`` knows whose it is."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

import asyncpg
import pytest

from contracts import logs
from contracts.db import create_pool
from contracts.outbox import OutboxRelay
from contracts.settings import Settings
from tests.support import infra
from tests.support.processes import Service

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("service", "listener"),
    [("dispatcher", "outbox listener"), ("sse-gateway", "inbox listener")],
)
async def test_a_services_database_connections_carry_its_name(
    settings: Settings, tmp_path: Path, service: str, listener: str
) -> None:
    env = {
        "NOTIFLOW_ENV": "test",
        "NOTIFLOW_DATABASE_URL": settings.database_url,
        "NOTIFLOW_AMQP_URL": settings.amqp_url,
    }
    process = Service(service, env, tmp_path).start()
    try:
        process.wait_ready()
        conn = await asyncpg.connect(settings.database_url, timeout=10)
        try:
            names = {
                row["application_name"]
                for row in await conn.fetch(
                    "SELECT application_name FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            }
        finally:
            await conn.close()
    finally:
        process.stop()

    assert names == {service, f"{service} {listener}"}, names


def vhost(amqp_url: str) -> str:
    return unquote(urlsplit(amqp_url).path.lstrip("/"))


@pytest.mark.parametrize(
    ("service", "names"),
    [
        ("comments", ["comments"]),
        ("dispatcher", ["dispatcher", "dispatcher consumers"]),
        ("sse-gateway", ["sse-gateway", "sse-gateway consumers"]),
    ],
)
def test_a_services_broker_connections_carry_its_name(
    settings: Settings, tmp_path: Path, service: str, names: list[str]
) -> None:
    env = {
        "NOTIFLOW_ENV": "test",
        "NOTIFLOW_DATABASE_URL": settings.database_url,
        "NOTIFLOW_AMQP_URL": settings.amqp_url,
    }
    process = Service(service, env, tmp_path).start()
    try:
        process.wait_ready()
        found = infra.connection_names(vhost(settings.amqp_url))
    finally:
        process.stop()

    assert found == names


def test_a_name_the_broker_url_gives_wins_over_the_services(
    settings: Settings, tmp_path: Path
) -> None:
    env = {
        "NOTIFLOW_ENV": "test",
        "NOTIFLOW_DATABASE_URL": settings.database_url,
        "NOTIFLOW_AMQP_URL": f"{settings.amqp_url}?name=billing%20box",
    }
    process = Service("dispatcher", env, tmp_path).start()
    try:
        process.wait_ready()
        found = infra.connection_names(vhost(settings.amqp_url))
    finally:
        process.stop()

    assert found == ["billing box", "billing box"]


async def test_an_outbox_relay_names_the_connection_it_opens_itself(
    settings: Settings,
) -> None:
    pool = await create_pool(settings)
    relay = OutboxRelay(pool, settings)
    try:
        await relay.start()
        found = infra.connection_names(vhost(settings.amqp_url))
    finally:
        await relay.stop()
        await pool.close()

    assert found == [f"{logs.service()} outbox relay"]


async def test_notiflow_admin_names_its_broker_connection(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aio_pika

    from contracts import admin, topology

    async with await aio_pika.connect(settings.amqp_url, timeout=10) as setup:
        await topology.declare(await setup.channel(), settings.retry_delay_levels)
    seen: list[list[str]] = []
    connect = admin.aio_pika.connect

    async def watched(*args: object, **kwargs: object) -> object:
        connection = await connect(*args, **kwargs)  # type: ignore[arg-type]
        seen.append(infra.connection_names(vhost(settings.amqp_url)))
        return connection

    monkeypatch.setattr(admin.aio_pika, "connect", watched)
    await admin.dlq_list(settings)

    assert seen == [[f"{logs.service()} admin"]]
