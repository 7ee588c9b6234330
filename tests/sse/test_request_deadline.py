"""A connection that does not finish a request's headers in time is closed; one
whose headers arrived is served as long as it takes."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Callable

import pytest

from contracts.settings import Settings
from tests.sse import helpers
from tests.sse.conftest import StartGateway
from tests.support.data import Demo

pytestmark = pytest.mark.integration

DEADLINE = 1.0


async def _connected(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing, or None if it is still open."""
    loop = asyncio.get_running_loop()
    received = b""
    ends = time.monotonic() + seconds
    while (left := ends - time.monotonic()) > 0:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), left)
        except TimeoutError:
            return None
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    return None


async def test_a_request_whose_headers_never_end_is_closed(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway(NOTIFLOW_HTTP_HEADERS_TIMEOUT=str(DEADLINE))
    loop = asyncio.get_running_loop()
    partial, silent, kept = [await _connected(gateway.port) for _ in range(3)]
    try:
        await loop.sock_sendall(partial, b"GET /sse HTTP/1.1\r\nHost: x\r\n")
        # Kept alive after a whole request, then part of a second one.
        await loop.sock_sendall(kept, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.3)
        await loop.sock_sendall(kept, b"GET /healthz HTTP/1.1\r\nHo")

        closed = [await _closed_within(s, 10) for s in (partial, silent, kept)]
    finally:
        for sock in (partial, silent, kept):
            sock.close()

    assert closed[0] == b"" and closed[1] == b""
    assert closed[2] is not None and closed[2].startswith(b"HTTP/1.1 200")
    assert closed[2].count(b"HTTP/1.1") == 1


async def test_a_stream_whose_headers_arrived_outlives_the_deadline(
    settings: Settings,
    start_gateway: StartGateway,
    demo: Demo,
    token: Callable[..., str],
) -> None:
    gateway = start_gateway(NOTIFLOW_HTTP_HEADERS_TIMEOUT=str(DEADLINE))
    loop = asyncio.get_running_loop()
    sock = await _connected(gateway.port)
    try:
        await loop.sock_sendall(
            sock,
            (
                "GET /sse HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {token(demo.bob)}\r\n\r\n"
            ).encode(),
        )
        assert await _closed_within(sock, DEADLINE * 3) is None
        async with helpers.database(settings.database_url) as pg:
            await helpers.add_and_deliver(pg, demo.bob, "after the deadline")
        received = b""
        while b"after the deadline" not in received:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
            assert chunk, "the stream was closed"
            received += chunk
    finally:
        sock.close()


async def _exchange(port: int, *writes: bytes) -> bytes | None:
    loop = asyncio.get_running_loop()
    sock = await _connected(port)
    try:
        for data in writes:
            await loop.sock_sendall(sock, data)
        return await _closed_within(sock, 10)
    except (BrokenPipeError, ConnectionResetError):
        return await _closed_within(sock, 10)
    finally:
        sock.close()


async def test_headers_past_the_limit_get_431_and_the_connection_closed(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway()
    start = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
    # A header's value sent in pieces, each quick enough for the deadline.
    answer = await _exchange(gateway.port, start, *[b"a" * 16384] * 8, b"\r\n\r\n")

    assert answer is not None
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert answer.endswith(b"Request header fields too large.")


async def test_headers_under_the_limit_and_a_body_sent_with_them_are_served(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway()
    big = b"a" * 60000
    headers = b"X-Big: " + big + b"\r\nConnection: close\r\n"
    answer = await _exchange(
        gateway.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    )
    # Headers of 60 KB and a body of 60 KB in one write: the body is no header.
    body = await _exchange(
        gateway.port,
        b"POST /inbox/read-all HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n"
        b"Content-Type: application/json\r\nX-Big: " + big + b"\r\n"
        b"Connection: close\r\n\r\n" + b" " * 60000,
    )

    assert answer is not None and answer.startswith(b"HTTP/1.1 200 ")
    assert body is not None and body.startswith(b"HTTP/1.1 401 ")


async def test_headers_past_the_limit_in_one_read_get_431_too(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway()
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000
    answer = await _exchange(gateway.port, request + b"\r\n\r\n")

    assert answer is not None and answer.startswith(b"HTTP/1.1 431 ")


async def test_a_request_after_a_large_body_is_answered_not_refused(
    start_gateway: StartGateway,
) -> None:
    # The first request's body and the start of the second's headers arrive in
    # one read: the body is no part of the second request's headers.
    gateway = start_gateway()
    body = b" " * 65_000
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 65000\r\n\r\n" + body
    loop = asyncio.get_running_loop()
    sock = await _connected(gateway.port)
    try:
        await loop.sock_sendall(sock, first + b"GET /healthz HTTP/1.1\r\nHo")
        await asyncio.sleep(0.5)
        await loop.sock_sendall(sock, b"st: x\r\nConnection: close\r\n\r\n")
        answer = await _closed_within(sock, 10)
    finally:
        sock.close()

    assert answer is not None
    assert answer.count(b"HTTP/1.1 200 ") == 2, answer[:300]
    assert b" 431 " not in answer


async def test_a_refused_request_is_answered_after_the_requests_before_it(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway()
    fine = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"

    answer = await _exchange(gateway.port, fine + fine + big + fine)

    assert answer is not None
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"200", b"431"]


async def test_a_body_that_stops_half_way_is_answered_408_and_closed(
    start_gateway: StartGateway, demo: Demo, token: Callable[..., str]
) -> None:
    gateway = start_gateway(NOTIFLOW_HTTP_BODY_TIMEOUT=str(DEADLINE))
    loop = asyncio.get_running_loop()
    unsigned, signed = [await _connected(gateway.port) for _ in range(2)]
    started = b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    try:
        # Whether the token is good or missing, the body is waited for no longer.
        await loop.sock_sendall(
            unsigned, b"PATCH /preferences HTTP/1.1\r\nHost: x\r\n" + started
        )
        await loop.sock_sendall(
            signed,
            b"PATCH /preferences HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {token(demo.bob)}\r\n".encode()
            + started,
        )
        answers = [await _closed_within(s, 10) for s in (unsigned, signed)]
    finally:
        unsigned.close()
        signed.close()

    for answer in answers:
        assert answer is not None, "the connection was still open after 10 s"
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"NOTIFLOW_HTTP_BODY_TIMEOUT" in answer


async def test_bytes_that_are_no_request_are_refused_after_the_answer_before_them(
    start_gateway: StartGateway, demo: Demo, token: Callable[..., str]
) -> None:
    # The request is carried out: its answer must reach the client before the
    # 400 for what followed it on the connection.
    gateway = start_gateway()
    request = (
        b"PATCH /preferences HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {token(demo.bob)}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: 16\r\n\r\n"
        + b'{"email": false}'
    )

    answer = await _exchange(gateway.port, request + b"BAD REQUEST LINE\r\n\r\n")

    assert answer is not None
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"400"]
    assert b'"email":false' in answer
