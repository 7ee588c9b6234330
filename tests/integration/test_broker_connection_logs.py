"""What a service logs when its broker connections drop and come back.

An operator reading the logs of a service whose link to RabbitMQ failed for a
moment should find, for each connection, one warning that it was lost and why,
however many attempts the reconnecting took, one line that it is back, and no
errors for a recovery that went as it should.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from contracts.settings import Settings, amqp_connection_name
from dispatcher.app import DispatcherSettings, create_app
from tests.integration.proxy import Proxy
from tests.support.infra import close_connections
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

RECONNECT_SECONDS = 0.5


async def test_a_broken_broker_link_is_logged_lost_once_then_restored(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = Proxy("127.0.0.1", 5672)
    await proxy.start()
    try:
        async with _dispatcher(settings, proxy.port, caplog) as (status, names):
            await proxy.cut()
            await eventually(lambda: _is(status, 503), what="not ready", timeout=15)
            # Long enough for several attempts to reconnect to fail.
            await asyncio.sleep(4 * RECONNECT_SECONDS)
            await proxy.start()
            await eventually(lambda: _is(status, 200), what="ready again", timeout=30)
            await eventually(
                lambda: _logged(caplog, "broker.connection_restored", names),
                what="both recoveries logged",
                timeout=15,
            )
    finally:
        await proxy.close()

    _assert_lost_once_then_restored(caplog, names)


async def test_connections_the_broker_closes_are_logged_lost_then_restored(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with _dispatcher(settings, 5672, caplog) as (status, names):
        vhost = settings.amqp_url.rsplit("/", 1)[1]
        closed = await asyncio.to_thread(close_connections, vhost, "")
        await eventually(
            lambda: _logged(caplog, "broker.connection_restored", names),
            what="both recoveries logged",
            timeout=30,
        )
        await eventually(lambda: _is(status, 200), what="ready again", timeout=30)

    assert closed == 2
    _assert_lost_once_then_restored(caplog, names)
    assert all(
        "CONNECTION_FORCED - closed by a test" in r.getMessage()
        for r in _records(caplog, "broker.connection_lost")
    )


@asynccontextmanager
async def _dispatcher(
    settings: Settings, port: int, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[Callable[[], Awaitable[int]], set[str]]]:
    """A dispatcher on the broker at ``port``, ready, with the log captured from
    then on; its /readyz status, and the names of its two connections (the
    consumers' and the one its relay publishes on) as RabbitMQ shows them."""
    vhost = settings.amqp_url.rsplit("/", 1)[1]
    url = (
        f"amqp://guest:guest@127.0.0.1:{port}/{vhost}"
        f"?reconnect_interval={RECONNECT_SECONDS}"
    )
    names = {amqp_connection_name(url), amqp_connection_name(url, "consumers")}
    app = create_app(DispatcherSettings(**settings.model_dump() | {"amqp_url": url}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:

            async def status() -> int:
                return (await c.get("/readyz")).status_code

            assert await status() == 200
            caplog.clear()
            caplog.set_level(logging.INFO)
            yield status, names


def _assert_lost_once_then_restored(
    caplog: pytest.LogCaptureFixture, names: set[str]
) -> None:
    lost = _records(caplog, "broker.connection_lost")
    assert sorted(r.connection for r in lost) == sorted(names)  # type: ignore[attr-defined]
    assert {r.levelno for r in lost} == {logging.WARNING}
    assert all(
        f"reconnecting every {RECONNECT_SECONDS} s" in r.getMessage() for r in lost
    )
    restored = _records(caplog, "broker.connection_restored")
    assert sorted(r.connection for r in restored) == sorted(names)  # type: ignore[attr-defined]
    assert {r.levelno for r in restored} == {logging.INFO}
    # Nothing in the recovery was an error, not the clients' own steps either.
    errors = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(("aio_pika", "aiormq"))
    ]
    assert errors == []


def _records(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "action", None) == action]


async def _logged(
    caplog: pytest.LogCaptureFixture, action: str, names: set[str]
) -> bool:
    return {getattr(r, "connection", None) for r in _records(caplog, action)} >= names


async def _is(status: Callable[[], Awaitable[int]], expected: int) -> bool:
    return await status() == expected
