"""Every connection a service opens to PostgreSQL names the service, so that an
operator reading ``pg_stat_activity`` (or the server's log) knows whose it is."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from contracts.settings import Settings
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
