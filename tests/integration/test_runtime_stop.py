"""A service's runtime leaves nothing open behind it, however its stop or start goes.

A broker connection left open is worse than a leak: aio-pika goes on reconnecting it
for as long as the process lives, and swallows the cancellation meant to end it.
"""

from __future__ import annotations

import asyncio
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
import pytest

from contracts import topology
from contracts.messages import DeliveryRequested
from contracts.runtime import Runtime
from contracts.settings import Settings
from tests.integration.proxy import Proxy
from tests.support import infra
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


def _vhost(settings: Settings) -> str:
    return unquote(urlsplit(settings.amqp_url).path.lstrip("/"))


async def _database_sessions(settings: Settings) -> int:
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()


async def _nothing_left_open(settings: Settings) -> None:
    vhost = _vhost(settings)

    async def closed() -> bool:
        names = await asyncio.to_thread(infra.connection_names, vhost)
        return not names and await _database_sessions(settings) == 0

    await eventually(closed, what="no broker connection and no database session")


async def _started(settings: Settings) -> Runtime:
    runtime = Runtime(settings, relay=True, consumers=True)
    await runtime.start()
    # Both broker connections and the pool are up before the stop is tried.
    assert len(await asyncio.to_thread(infra.connection_names, _vhost(settings))) == 2
    return runtime


async def test_a_stop_whose_consumers_fail_still_closes_every_connection(
    settings: Settings,
) -> None:
    runtime = await _started(settings)
    assert runtime.consumers is not None

    async def failing(drain_seconds: float) -> None:
        raise RuntimeError("the consumers could not be stopped")

    runtime.consumers.stop = failing  # type: ignore[method-assign]

    with pytest.raises(RuntimeError, match="could not be stopped"):
        await runtime.stop()

    await _nothing_left_open(settings)


async def test_a_cancelled_stop_still_closes_every_connection(
    settings: Settings,
) -> None:
    runtime = await _started(settings)
    assert runtime.consumers is not None

    async def endless(drain_seconds: float) -> None:
        await asyncio.Event().wait()

    runtime.consumers.stop = endless  # type: ignore[method-assign]

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1):
            await runtime.stop()

    await _nothing_left_open(settings)


async def test_a_start_that_fails_part_way_leaves_nothing_open(
    settings: Settings,
) -> None:
    runtime = Runtime(settings, relay=True, consumers=True)
    assert runtime.broker is not None

    async def refused() -> None:
        raise ConnectionRefusedError("the consumers' broker connection was refused")

    runtime.broker.start = refused  # type: ignore[method-assign]

    with pytest.raises(ConnectionRefusedError):
        await runtime.start()

    await _nothing_left_open(settings)


async def test_a_stop_while_the_broker_does_not_answer_still_ends(
    settings: Settings,
) -> None:
    url = urlsplit(settings.amqp_url)
    proxy = Proxy(url.hostname or "127.0.0.1", url.port or 5672)
    await proxy.start()
    netloc = url.netloc.rsplit(":", 1)[0] + f":{proxy.port}"
    through = urlunsplit(url._replace(netloc=netloc))
    runtime = Runtime(
        settings.model_copy(update={"amqp_url": through}), relay=True, consumers=True
    )

    async def handler(message: DeliveryRequested, raw: object) -> None:
        pass

    runtime.subscribe(
        topology.delivery_queue("email"),
        DeliveryRequested,
        handler,
        prefetch=1,
        action="test",
    )
    await runtime.start()
    try:
        # Connections open, nothing answered: every close waits for a reply that
        # never comes, for as long as the stop lets it.
        proxy.hang()
        async with asyncio.timeout(45):
            await runtime.stop()
    finally:
        await proxy.close()
