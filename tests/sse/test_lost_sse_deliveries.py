"""An in-app notification whose delivery message was lost still reaches the inbox.

The SSE delivery queue is a classic queue: a purge, or a queue deleted and declared
again, loses the messages of rows still ``pending``. The gateway's sweeper publishes
such a row's delivery again through the outbox, and a relay (of any other service;
here the test's own) publishes it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from contracts.db import create_pool
from contracts.outbox import OutboxRelay
from contracts.settings import Settings
from tests.sse.conftest import StartGateway
from tests.sse.helpers import add, database
from tests.support.data import Demo
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def relay(settings: Settings) -> AsyncIterator[OutboxRelay]:
    pool = await create_pool(settings, min_size=1, max_size=2)
    relay = OutboxRelay(pool, settings)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()
        await pool.close()


async def test_a_pending_sse_row_with_no_message_is_delivered_by_the_sweeper(
    settings: Settings,
    demo: Demo,
    start_gateway: StartGateway,
    relay: OutboxRelay,
) -> None:
    async with database(settings.database_url) as conn:
        lost = await add(conn, demo.bob, "lost")
        young = await add(conn, demo.bob, "young")
        await conn.execute(
            "UPDATE notifications SET created_at = now() - interval '2 minutes', "
            "updated_at = now() - interval '2 minutes' WHERE id = $1",
            lost,
        )
        start_gateway(
            NOTIFLOW_SSE_SWEEP_SECONDS="0.5", NOTIFLOW_PENDING_REPUBLISH_SECONDS="60"
        )

        async def delivered() -> bool:
            return (
                await conn.fetchval(
                    "SELECT status FROM notifications WHERE id = $1", lost
                )
                == "sent"
            )

        await eventually(delivered, what="the lost row delivered", timeout=20)
        rows = {
            r["id"]: r
            for r in await conn.fetch(
                "SELECT id, status, inbox_seq, republished_at FROM notifications"
            )
        }

    assert rows[lost]["inbox_seq"] == 1
    assert rows[lost]["republished_at"] is not None
    # A row younger than the age waits for its own message.
    assert rows[young]["status"] == "pending"
    assert rows[young]["republished_at"] is None
