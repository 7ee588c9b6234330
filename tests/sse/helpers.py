"""Notifications written straight to PostgreSQL, and the gateway's own counters.

``add`` inserts a pending in-app notification the way the dispatcher does;
``deliver`` runs the gateway's delivery transaction on it, as a replica consuming
the delivery would. Tests use them to control commit order exactly.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import httpx

from sse_gateway import inbox

ADD_EVENT = """
INSERT INTO events (id, type, payload, occurred_at)
VALUES ($1, 'comment.created', '{}', now())
"""

ADD_NOTIFICATION = """
INSERT INTO notifications (
    event_id, user_id, title, message, type, channel, metadata, event_occurred_at
)
VALUES ($1, $2, $3, $4, $6, 'comment.mention', $5, now())
RETURNING id
"""


@asynccontextmanager
async def database(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url, timeout=10)
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
    try:
        yield conn
    finally:
        await conn.close()


async def add(
    conn: asyncpg.Connection, user_id: int, title: str = "hello", type_: str = "sse"
) -> int:
    """A waiting notification row of ``type_``, with an event of its own."""
    event_id = uuid.uuid4()
    await conn.execute(ADD_EVENT, event_id)
    return await conn.fetchval(
        ADD_NOTIFICATION,
        event_id,
        user_id,
        title,
        f"{title}: body",
        {"n": title},
        type_,
    )


async def deliver(conn: asyncpg.Connection, notification_id: int) -> None:
    async with conn.transaction():
        previous = await inbox.deliver(conn, notification_id)
    if previous is not None:
        raise AssertionError(f"notification {notification_id} was {previous}")


async def add_and_deliver(
    conn: asyncpg.Connection, user_id: int, title: str = "hello"
) -> int:
    notification_id = await add(conn, user_id, title)
    await deliver(conn, notification_id)
    return notification_id


async def gauges(base_url: str) -> dict[str, float]:
    """The gateway's ``notiflow_sse_*`` series, by name."""
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        text = (await client.get("/metrics")).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("notiflow_sse_"):
            name, _, value = line.partition(" ")
            found[name] = float(value)
    return found


async def raw_stream(
    port: int, token: str, *, last_event_id: int | None = None
) -> socket.socket:
    """A non-blocking socket that has asked the gateway on ``port`` for ``/sse``,
    with a 4 KiB receive window: a peer whose reading the test paces itself."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    resume = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
    request = (
        "GET /sse HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\n{resume}\r\n"
    )
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request.encode())
    except BaseException:
        sock.close()
        raise
    return sock
