"""The bench's HTTP/1.1 client and its SSE reader, against scripted local servers.

Each test starts a tiny asyncio server on 127.0.0.1 that answers the way the test
says, and looks at what the client did: what it sent, how many connections it
opened, what it made of the answer. Nothing here measures speed.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from bench import http1, load
from tests.bench.scripted import Server, created


async def test_a_post_carries_its_body_and_reuses_the_connection() -> None:
    async with Server(created()) as server, http1.Pool(server.url, size=4) as pool:
        request = pool.prepare("POST", "/comments", {"Authorization": "Bearer t"})

        first = await pool.send(request, b'{"post_id":1}')
        second = await pool.send(request, b'{"post_id":2}')

    assert (first.status, first.body) == (201, b'{"id":7}')
    assert first.headers[b"content-type"] == b"application/json"
    assert second.status == 201
    assert server.connections == 1
    head, body = server.requests[0]
    assert head.startswith(b"POST /comments HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}".encode() in head
    assert b"Authorization: Bearer t\r\n" in head
    assert b"Content-Length: 13\r\n" in head
    assert body == b'{"post_id":1}'


async def test_a_get_sends_no_content_length() -> None:
    async with Server(created()) as server:
        conn = http1.Connection("127.0.0.1", server.port)
        try:
            await conn.send(http1.prepare("GET", "/", "127.0.0.1"))
        finally:
            conn.close()

    assert b"content-length" not in server.requests[0][0].lower()


async def test_a_chunked_answer_is_put_back_together() -> None:
    async def chunked(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 422 Unprocessable Entity\r\ntransfer-encoding: chunked\r\n\r\n"
            b'6\r\n{"a":1\r\n1;ext=1\r\n}\r\n0\r\nx-trailer: 1\r\n\r\n'
        )
        await writer.drain()
        return True

    async with Server(chunked) as server, http1.Pool(server.url, size=1) as pool:
        request = pool.prepare("POST", "/comments")
        first = await pool.send(request, b"{}")
        second = await pool.send(request, b"{}")

    assert (first.status, first.body) == (422, b'{"a":1}')
    assert second.body == b'{"a":1}'
    assert server.connections == 1


async def test_a_connection_the_server_closes_is_opened_again() -> None:
    async def once(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 201 Created\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"
        )
        await writer.drain()
        return False

    async with Server(once) as server, http1.Pool(server.url, size=1) as pool:
        request = pool.prepare("POST", "/comments")
        answers = [await pool.send(request, b"") for _ in range(3)]

    assert [a.body for a in answers] == [b"ok"] * 3
    assert server.connections == 3


async def test_an_idle_connection_closed_by_the_server_is_not_reused() -> None:
    async def then_close(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        await created()(head, _, writer)
        return False  # closes without saying so, as a keep-alive timeout does

    async with Server(then_close) as server:
        conn = http1.Connection("127.0.0.1", server.port)
        request = http1.prepare("POST", "/comments", "127.0.0.1")
        try:
            await conn.send(request, b"")
            deadline = time.monotonic() + 5
            while conn.is_open and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

            again = await conn.send(request, b"")
        finally:
            conn.close()

    assert again.status == 201
    assert server.connections == 2


async def test_a_connection_idle_too_long_is_replaced_before_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http1, "MAX_IDLE_S", -1.0)

    async with Server(created()) as server, http1.Pool(server.url, size=1) as pool:
        request = pool.prepare("POST", "/comments")
        for _ in range(3):
            await pool.send(request, b"")

    assert server.connections == 3


async def test_a_server_that_hangs_up_gives_request_failed_and_the_pool_recovers() -> (
    None
):
    answers = iter([False, True])

    async def flaky(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        if next(answers):
            return await created()(head, body, writer)
        return False

    async with Server(flaky) as server, http1.Pool(server.url, size=1) as pool:
        request = pool.prepare("POST", "/comments")
        with pytest.raises(http1.RequestFailed, match="before answering"):
            await pool.send(request, b"")
        recovered = await pool.send(request, b"")

    assert recovered.status == 201


async def test_no_answer_within_the_timeout_is_request_failed() -> None:
    async def silent(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(30)
        return False

    async with (
        Server(silent) as server,
        http1.Pool(server.url, size=1, timeout=0.2) as pool,
    ):
        with pytest.raises(http1.RequestFailed, match="no answer"):
            await pool.send(pool.prepare("POST", "/comments"), b"")


async def test_a_cancelled_request_gives_its_connection_back_closed() -> None:
    answers = iter([False, True])

    async def first_hangs(
        head: bytes, body: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        if next(answers):
            return await created()(head, body, writer)
        await asyncio.sleep(30)  # until the test ends and the server stops
        return False

    async with Server(first_hangs) as server, http1.Pool(server.url, size=1) as pool:
        request = pool.prepare("POST", "/comments")
        hanging = asyncio.create_task(pool.send(request, b""))
        deadline = time.monotonic() + 5
        while not server.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        hanging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hanging

        answered = await pool.send(request, b"")

    assert answered.status == 201
    assert server.connections == 2


async def test_garbage_instead_of_http_is_request_failed() -> None:
    async def garbage(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        return False

    async with Server(garbage) as server, http1.Pool(server.url, size=1) as pool:
        with pytest.raises(http1.RequestFailed, match="not an HTTP"):
            await pool.send(pool.prepare("GET", "/"))


async def test_the_pool_holds_at_most_its_size_of_connections() -> None:
    async def slow(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)
        return await created()(head, body, writer)

    async with Server(slow) as server, http1.Pool(server.url, size=2) as pool:
        request = pool.prepare("POST", "/comments")
        answers = await asyncio.gather(*(pool.send(request, b"") for _ in range(6)))

    assert [a.status for a in answers] == [201] * 6
    assert server.connections == 2
    assert server.most_open == 2


def test_only_plain_http_urls_make_a_pool() -> None:
    with pytest.raises(ValueError, match="https://x"):
        http1.Pool("https://x", size=1)


async def test_the_sse_reader_notes_each_notification_with_both_ids() -> None:
    sent = asyncio.Event()

    async def stream(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        assert head.startswith(b"GET /sse HTTP/1.1\r\n")
        assert b"Authorization: Bearer token-0\r\n" in head
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        events = [
            b": connected\r\nretry: 1000\r\n\r\n",
            b'event: notification\r\nid: 41\r\ndata: {"metadata":',
            b'{"comment_id":9}}\r\n\r\n: ping\r\n\r\n',
        ]
        for event in events:
            writer.write(b"%x\r\n%b\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.01)
        sent.set()
        await asyncio.sleep(30)
        return False

    cast = load.Cast(user_ids=[1], tokens=["token-0"])
    async with Server(stream) as server:
        async with load.Streams(server.url, cast) as streams:
            await asyncio.wait_for(sent.wait(), timeout=5)
            deadline = time.monotonic() + 5
            while not streams.arrivals and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

    assert [(c, n) for c, n, _ in streams.arrivals] == [(9, 41)]
    assert streams.disconnects == 0
