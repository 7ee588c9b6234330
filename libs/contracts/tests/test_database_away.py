"""Which errors mean the database is away (wait for it) and which are bugs (set the
message aside): the first by where they came from, not only by their type."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from faststream.rabbit import RabbitBroker
from jinja2 import TemplateNotFound

from contracts.consumer import Consumers, Publisher
from contracts.db import DatabaseUnavailable, connection, create_pool, is_unavailable
from contracts.http import install_http_policy
from contracts.settings import Settings
from tests.support import infra

pytestmark = pytest.mark.integration


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def idle_consumers() -> Consumers:
    """Consumers that never publish: enough to run a handler as a queue would."""

    def no_publisher() -> Publisher:
        raise AssertionError("nothing is published here")

    return Consumers(RabbitBroker(), no_publisher)


async def raised(call: Callable[[], Awaitable[object]]) -> BaseException:
    try:
        await call()
    except Exception as exc:
        return exc
    raise AssertionError("nothing was raised")


async def test_a_refused_connection_is_the_database_away() -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres"

    refused = await raised(lambda: asyncpg.connect(url, timeout=5))

    assert isinstance(refused, OSError)
    assert is_unavailable(refused)


async def test_a_database_that_refuses_new_connections_is_away(
    settings: Settings,
) -> None:
    pool = await create_pool(settings, min_size=0, max_size=1)
    name = settings.database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(infra.database_url("postgres"), timeout=10)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        refused = await raised(lambda: _take(pool))
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
        await pool.close()

    assert isinstance(refused, DatabaseUnavailable)
    assert "not currently accepting connections" in str(refused)


async def _take(pool: asyncpg.Pool) -> None:
    async with connection(pool, timeout=5):
        pass


async def test_a_pool_whose_connections_are_all_in_use_says_so_not_that_the_db_is_away(
    settings: Settings,
) -> None:
    pool = await create_pool(settings, min_size=1, max_size=1)
    try:
        async with connection(pool):
            busy = await raised(lambda: _take_within(pool, 0.2))
    finally:
        await pool.close()

    assert isinstance(busy, DatabaseUnavailable)
    assert "all 1 of the pool's connections stayed in use for 0.2s" in str(busy)
    assert "NOTIFLOW_DB_POOL_MAX" in str(busy)


async def test_a_request_finding_the_pool_all_in_use_is_told_the_service_is_busy(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await create_pool(settings, min_size=1, max_size=1)
    app = FastAPI()
    install_http_policy(app)

    @app.get("/work")
    async def work() -> dict[str, bool]:
        async with connection(pool, timeout=0.2):
            return {"done": True}

    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    )
    try:
        async with client, connection(pool):
            with caplog.at_level(logging.WARNING, logger="contracts.http"):
                busy = await client.get("/work")
    finally:
        await pool.close()

    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "2"
    assert busy.json()["detail"] == "the service is busy; try again"
    assert any(
        "all 1 of the pool's connections stayed in use" in r.getMessage()
        for r in caplog.records
    ), caplog.text


async def _take_within(pool: asyncpg.Pool, timeout: float) -> None:
    async with connection(pool, timeout=timeout):
        pass


async def test_a_statement_past_its_command_timeout_is_the_database_away(
    settings: Settings,
) -> None:
    pool = await create_pool(settings, min_size=1, max_size=1, command_timeout=0.2)
    try:
        async with connection(pool) as conn:
            timed_out = await raised(lambda: conn.execute("SELECT pg_sleep(2)"))
    finally:
        await pool.close()

    assert isinstance(timed_out, TimeoutError)
    assert is_unavailable(timed_out)


@pytest.mark.parametrize("limit", ["asyncio.timeout", "wait_for"])
async def test_a_statement_cut_short_by_a_timeout_is_the_database_away(
    settings: Settings, limit: str
) -> None:
    conn = await asyncpg.connect(settings.database_url)

    async def bounded() -> None:
        if limit == "wait_for":
            await asyncio.wait_for(conn.execute("SELECT pg_sleep(2)"), 0.2)
            return
        async with asyncio.timeout(0.2):
            await conn.execute("SELECT pg_sleep(2)")

    try:
        timed_out = await raised(bounded)
    finally:
        conn.terminate()

    assert isinstance(timed_out, TimeoutError)
    assert is_unavailable(timed_out)


async def test_the_same_errors_from_other_code_are_not_the_database_away() -> None:
    async def missing_file() -> None:
        await asyncio.to_thread(Path("/nonexistent/template.j2").read_text)

    async def missing_template() -> None:
        raise TemplateNotFound("comment_mention/title.txt.j2")

    async def slow() -> None:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)

    async def refused() -> None:
        await asyncio.open_connection("127.0.0.1", closed_port())

    for call in (missing_file, missing_template, slow, refused):
        error = await raised(call)
        assert isinstance(error, OSError), call
        assert not is_unavailable(error), error


def test_database_unavailable_and_asyncpg_connection_errors_are_always_away() -> None:
    assert is_unavailable(DatabaseUnavailable("no database connection"))
    assert is_unavailable(asyncpg.CannotConnectNowError("starting up"))
    assert is_unavailable(asyncpg.InterfaceError("connection is closed"))
    assert not is_unavailable(asyncpg.UniqueViolationError("duplicate key"))
    assert not is_unavailable(ValueError("a bug"))


async def test_a_handler_error_shaped_like_an_outage_is_not_waited_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumers = idle_consumers()
    calls = 0

    async def handler() -> None:
        nonlocal calls
        calls += 1
        raise TemplateNotFound("comment_mention/title.txt.j2")

    with caplog.at_level(logging.WARNING), pytest.raises(TemplateNotFound):
        await asyncio.wait_for(
            consumers.while_database_away(handler, queue="q", action="test"), 5
        )

    assert calls == 1
    assert "database unavailable" not in caplog.text


async def test_a_database_outage_is_still_waited_out() -> None:
    consumers = idle_consumers()
    calls = 0

    async def handler() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise DatabaseUnavailable("no database connection")
        return "stored"

    result = await asyncio.wait_for(
        consumers.while_database_away(handler, queue="q", action="test"), 10
    )

    assert (result, calls) == ("stored", 3)
