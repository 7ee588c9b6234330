"""A reader on a slow link catches up on a large replay without being dropped,
and one that stops reading is still dropped (tests/sse/test_cleanup.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from contracts.settings import Settings
from tests.sse import helpers
from tests.sse.conftest import StartGateway
from tests.support.data import Demo

pytestmark = pytest.mark.integration

BACKLOG = 200
# Title, message and metadata each carry it: some 18 KB an event, 3.6 MB in all,
# more than the kernel buffers between the two ends of this connection.
TITLE = "x" * 6000
# Read through a small receive window (helpers.raw_stream), 16 KiB at a time
# with a pause after each: a few hundred KB/s, at which the gateway's writes wait
# on the kernel far longer than the send timeout while every second brings bytes.
READ_BYTES = 16 * 1024
PAUSE = 0.008


async def test_a_slow_reader_catches_up_on_a_large_replay(
    settings: Settings,
    start_gateway: StartGateway,
    demo: Demo,
    token: Callable[..., str],
) -> None:
    gateway = start_gateway(NOTIFLOW_SSE_SEND_TIMEOUT="1")
    async with helpers.database(settings.database_url) as pg:
        seen = await helpers.add_and_deliver(pg, demo.bob, "seen")
        async with pg.transaction():
            for _ in range(BACKLOG):
                nid = await helpers.add(pg, demo.bob, TITLE)
                await helpers.inbox.deliver(pg, nid)

    loop = asyncio.get_running_loop()
    sock = await helpers.raw_stream(gateway.port, token(demo.bob), last_event_id=seen)
    received = bytearray()
    try:
        deadline = time.monotonic() + 60
        while received.count(b"event: notification") < BACKLOG:
            assert time.monotonic() < deadline, "the replay did not arrive in 60 s"
            chunk = await asyncio.wait_for(loop.sock_recv(sock, READ_BYTES), 10)
            if not chunk:
                break  # the gateway ended the stream
            received += chunk
            await asyncio.sleep(PAUSE)
    except ConnectionResetError:
        pass  # judged below, by what arrived
    finally:
        sock.close()

    assert received.count(b"event: notification") == BACKLOG
    assert "sse.stalled" not in gateway.log()
