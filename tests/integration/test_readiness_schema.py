"""What /readyz says of the database: a schema lost under the running services,
but not a pool whose every connection is busy."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from comments.app import create_app
from contracts.preflight import TABLES, known_migrations
from contracts.settings import Settings
from tests.integration.conftest import running

pytestmark = pytest.mark.integration


async def _readyz(settings: Settings, change: str) -> tuple[int, int, dict[str, str]]:
    """/readyz's status before and after ``change`` runs, and its last body."""
    app = create_app(settings)
    async with running(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            before = (await c.get("/readyz")).status_code
            conn = await asyncpg.connect(settings.database_url)
            try:
                await conn.execute(change)
            finally:
                await conn.close()
            after = await c.get("/readyz")
    return before, after.status_code, after.json()


async def test_readiness_fails_once_a_migration_is_rolled_back(
    settings: Settings,
) -> None:
    latest = max(known_migrations())
    before, after, body = await _readyz(
        settings, f"DELETE FROM _yoyo_migration WHERE migration_id = '{latest}'"
    )

    assert (before, after) == (200, 503)
    assert f"lacks migration(s) {latest}" in body["database"]
    assert "make migrate" in body["database"]


async def test_readiness_fails_once_the_tables_are_dropped(
    settings: Settings,
) -> None:
    every = ", ".join(TABLES)
    before, after, body = await _readyz(settings, f"DROP TABLE {every} CASCADE")

    assert (before, after) == (200, 503)
    assert "has no notiflow tables" in body["database"]


@pytest.mark.parametrize("table", ["comment_pace", "inbox_sequences", "notifications"])
async def test_readiness_fails_once_any_table_is_dropped_by_hand(
    settings: Settings, table: str
) -> None:
    before, after, body = await _readyz(settings, f"DROP TABLE {table} CASCADE")

    assert (before, after) == (200, 503)
    assert f"lacks table(s) {table}" in body["database"]


async def test_readiness_ignores_migrations_of_a_newer_release(
    settings: Settings,
) -> None:
    before, after, body = await _readyz(
        settings,
        "INSERT INTO _yoyo_migration (migration_hash, migration_id, applied_at_utc)"
        " VALUES ('newer', '9999_from_a_newer_release', now())",
    )

    assert (before, after) == (200, 200)
    assert body == {"status": "ready"}


async def test_a_pool_with_every_connection_in_use_is_still_ready(
    settings: Settings,
) -> None:
    app = create_app(settings.model_copy(update={"db_pool_min": 1, "db_pool_max": 1}))
    async with running(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            runtime = app.state.runtime
            async with runtime.db.acquire():
                busy = await c.get("/readyz")
            after = await c.get("/readyz")

    assert busy.status_code == 200, busy.text
    assert after.status_code == 200
