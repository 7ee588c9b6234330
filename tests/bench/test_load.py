"""The open-loop offer against a scripted comments endpoint.

What matters is bookkeeping, not speed: each accepted comment is noted with its due
time under the id the server gave it, and every other outcome is an error with a
sample that says what came back.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from bench import http1, load
from tests.bench.scripted import Server
from tests.support.processes import free_port


async def test_offer_notes_accepted_comments_by_id_and_counts_the_rest() -> None:
    async def comments(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        index = int(json.loads(body)["body"].split()[-1].rstrip("."))
        if index == 3:
            status, answer = b"503 Service Unavailable", b'{"error":"unavailable"}'
        elif index == 5:
            status, answer = b"201 Created", b'{"unexpected":true}'
        else:
            status, answer = b"201 Created", b'{"id":%d,"post_id":1}' % (100 + index)
        writer.write(
            b"HTTP/1.1 %b\r\ncontent-length: %d\r\n\r\n%b"
            % (status, len(answer), answer)
        )
        await writer.drain()
        return True

    cast = load.Cast(user_ids=list(range(load.USERS)), tokens=["t"] * load.USERS)
    posts = [[10 + c] for c in range(load.USERS)]
    sent = load.Sent()
    async with Server(comments) as server, http1.Pool(server.url, size=4) as pool:
        await load.offer(pool, cast, posts, 200.0, 0.05, 100, sent)

    assert sent.scheduled == 10
    assert sorted(sent.due) == [100 + i for i in range(10) if i not in (3, 5)]
    assert sent.errors == 2
    assert sent.skipped == 0
    assert len(sent.post_ms) == 8
    assert sorted(sent.error_samples) == [
        '201 without a comment id: {"unexpected":true}',
        '503 {"error":"unavailable"}',
    ]
    # Due times follow the schedule, not the answers: 1/200 s apart.
    assert sent.due[106] - sent.due[100] == pytest.approx(0.030)
    head, body = server.requests[0]
    assert b"Authorization: Bearer t\r\n" in head
    assert json.loads(body)["post_id"] in range(10, 10 + load.USERS)


async def test_offer_counts_a_refused_connection_as_an_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cast = load.Cast(user_ids=[1] * load.USERS, tokens=["t"] * load.USERS)
    sent = load.Sent()
    async with http1.Pool(url, size=1) as pool:
        await load.offer(pool, cast, [[1]] * load.USERS, 100.0, 0.02, 10, sent)

    assert (sent.scheduled, sent.errors, sent.due) == (2, 2, {})
    assert "RequestFailed" in sent.error_samples[0]
