"""Streams that come and go leave nothing behind: no hub entry, no task."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

import httpx
import pytest

from contracts.settings import Settings
from tests.sse import helpers
from tests.sse.conftest import StartGateway
from tests.support.data import Demo
from tests.support.processes import Service
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

CYCLES = 2000
PARALLEL = 25


async def open_and_drop(port: int, token: str, abort: bool) -> None:
    """Open a stream, read until it is live, then leave like a tab or a network."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = (
            "GET /sse HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
        )
        writer.write(request.encode())
        await asyncio.wait_for(reader.readuntil(b": connected"), timeout=10)
    finally:
        if abort:
            # A connection reset, as when the network drops: no FIN, no goodbye.
            sock = writer.get_extra_info("socket")
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        writer.close()
        await writer.wait_closed()


async def test_thousands_of_short_streams_leave_counts_where_they_started(
    start_gateway: StartGateway, demo: Demo, token: Callable[..., str]
) -> None:
    # One user cycles PARALLEL streams, and a closed one may still be counted for
    # a moment; the per-user limit is not what this test measures.
    gateway = start_gateway(NOTIFLOW_SSE_MAX_STREAMS_PER_USER=str(CYCLES))
    bob = token(demo.bob)
    await open_and_drop(gateway.port, bob, abort=False)
    baseline = await eventually(
        lambda: _idle(gateway), what="an idle gateway before the cycles"
    )

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(CYCLES):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            await open_and_drop(gateway.port, bob, abort=i % 2 == 1)

    await asyncio.gather(*(worker() for _ in range(PARALLEL)))
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
        heads = [
            await client.head("/sse", headers={"Authorization": f"Bearer {bob}"})
            for _ in range(20)
        ]
    assert {h.status_code for h in heads} == {200}

    after = await eventually(
        lambda: _back_to(gateway, baseline["notiflow_sse_asyncio_tasks"]),
        what="connections back to 0 and tasks back to the baseline",
    )
    assert after["notiflow_sse_connections"] == 0


async def _idle(gateway: Service) -> dict[str, float] | None:
    found = await helpers.gauges(gateway.url)
    return found if found.get("notiflow_sse_connections") == 0 else None


async def _back_to(gateway: Service, tasks: float) -> dict[str, float] | None:
    found = await helpers.gauges(gateway.url)
    idle = found.get("notiflow_sse_connections") == 0
    return found if idle and found.get("notiflow_sse_asyncio_tasks") == tasks else None


async def test_a_peer_that_stops_reading_is_dropped(
    settings: Settings,
    start_gateway: StartGateway,
    demo: Demo,
    token: Callable[..., str],
) -> None:
    gateway = start_gateway(NOTIFLOW_SSE_SEND_TIMEOUT="1")
    # A tiny receive window, never read: the server's writes soon stop draining.
    sock = await helpers.raw_stream(gateway.port, token(demo.bob))
    try:
        await eventually(
            lambda: _streams(gateway, 1), what="the stream open", timeout=10
        )
        big = "x" * 6000
        async with helpers.database(settings.database_url) as pg:
            for _ in range(4):
                async with pg.transaction():
                    for _ in range(200):
                        nid = await helpers.add(pg, demo.bob, big)
                        await helpers.inbox.deliver(pg, nid)
                if await _streams(gateway, 0):
                    break
        await eventually(
            lambda: _streams(gateway, 0), what="the stalled stream dropped"
        )
        # Dropped for good: the gateway holds no socket for it, though the peer
        # still keeps its end open.
        client_port = sock.getsockname()[1]
        await eventually(
            lambda: _no_server_socket(gateway.port, client_port),
            what="the gateway's socket for the stalled stream closed",
        )
    finally:
        sock.close()
    assert "sse.stalled" in gateway.log()
    assert "without completing response" not in gateway.log()


# /proc/net/tcp states a connection no longer holds its socket in (TIME_WAIT,
# CLOSE), in the kernel's hexadecimal.
_GONE = {"06", "07"}


async def _no_server_socket(server_port: int, client_port: int) -> bool:
    return await asyncio.to_thread(_no_socket, server_port, client_port)


def _no_socket(server_port: int, client_port: int) -> bool:
    """Whether no socket from ``server_port`` to ``client_port`` is still open."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    local, remote, state = fields[1], fields[2], fields[3]
                    if (
                        int(local.rsplit(":", 1)[1], 16) == server_port
                        and int(remote.rsplit(":", 1)[1], 16) == client_port
                        and state not in _GONE
                    ):
                        return False
        except FileNotFoundError:
            continue
    return True


async def _streams(gateway: Service, count: int) -> bool:
    found = await helpers.gauges(gateway.url)
    return found.get("notiflow_sse_connections") == count
