"""A service that loses RabbitMQ says so on /readyz, and recovers by itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
import pytest

from comments.app import create_app
from contracts.settings import Settings
from tests.integration.proxy import Proxy
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


async def test_comments_is_not_ready_while_the_broker_is_away(
    settings: Settings,
) -> None:
    proxy = Proxy("127.0.0.1", 5672)
    await proxy.start()
    vhost = settings.amqp_url.rsplit("/", 1)[1]
    through_proxy = settings.model_copy(
        update={"amqp_url": f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}"}
    )
    app = create_app(through_proxy)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:

                async def status() -> int:
                    return (await c.get("/readyz")).status_code

                assert await status() == 200

                await proxy.cut()
                down = await eventually(
                    lambda: _is(status, 503), what="not ready", timeout=15
                )
                body = (await c.get("/readyz")).json()

                await proxy.start()
                back = await eventually(
                    lambda: _is(status, 200), what="ready again", timeout=30
                )
    finally:
        await proxy.close()

    assert down and back
    assert body["broker"] == "broker connection is down"


async def _is(status: Callable[[], Awaitable[int]], expected: int) -> bool:
    return await status() == expected
