"""What this machine does with nothing of ours on top: the floor under every figure.

Each measurement is bounded in count and in time, runs against the bench's private
database and virtual host (or a scratch table and queue it removes), and returns a
single number:

* broker: aio-pika publishes persistent messages with publisher confirms (a window
  of 200 in flight) while a consumer with prefetch 100 acks them; messages per
  second until the last ack;
* PostgreSQL: 20 connections each INSERT one row per transaction;
* LISTEN/NOTIFY: one connection notifies, another hears it; median round trip;
* bare ASGI: uvicorn serving a constant response (bench/asgi_app.py) in a
  subprocess, hit over keep-alive connections by the bench's own minimal HTTP/1.1
  client (bench/http1.py), so the client costs as little as it can and the figure
  is mostly the server's.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aio_pika
import asyncpg

from bench import http1

ROOT = Path(__file__).resolve().parent.parent


async def broker_msgs_per_s(
    amqp_url: str, count: int = 20_000, window: int = 200, limit_s: float = 15.0
) -> float:
    queue_name = f"bench.baseline.{uuid.uuid4().hex[:8]}"
    body = b'{"schema_version":"1.0","notification_id":1}' + b" " * 200
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        pub = await connection.channel(publisher_confirms=True)
        sub = await connection.channel()
        await sub.set_qos(prefetch_count=100)
        queue = await sub.declare_queue(queue_name, durable=True)
        received = 0
        done = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            await message.ack()
            received += 1
            if received >= count:
                done.set()

        tag = await queue.consume(on_message)
        slots = asyncio.Semaphore(window)
        exchange = pub.default_exchange
        started = time.perf_counter()
        deadline = started + limit_s

        async def publish_one() -> None:
            try:
                message = aio_pika.Message(
                    body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                )
                await exchange.publish(message, routing_key=queue_name, timeout=10)
            finally:
                slots.release()

        tasks = []
        for _ in range(count):
            if time.perf_counter() > deadline:
                break
            await slots.acquire()
            tasks.append(asyncio.create_task(publish_one()))
        await asyncio.gather(*tasks)
        try:
            await asyncio.wait_for(
                done.wait(), max(1.0, deadline - time.perf_counter())
            )
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - started
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
        return received / elapsed
    finally:
        await connection.close()


async def pg_commits_per_s(
    database_url: str, connections: int = 20, seconds: float = 3.0
) -> float:
    table = f"bench_baseline_{uuid.uuid4().hex[:8]}"
    pool = await asyncpg.create_pool(
        database_url, min_size=connections, max_size=connections
    )
    try:
        await pool.execute(
            f"CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY "
            "PRIMARY KEY, payload text NOT NULL, at timestamptz DEFAULT now())"
        )
        stop = time.perf_counter() + seconds
        counts = [0] * connections

        async def writer(index: int) -> None:
            async with pool.acquire() as conn:
                while time.perf_counter() < stop:
                    async with conn.transaction():
                        await conn.execute(
                            f"INSERT INTO {table} (payload) VALUES ($1)", "x" * 100
                        )
                    counts[index] += 1

        started = time.perf_counter()
        await asyncio.gather(*(writer(i) for i in range(connections)))
        elapsed = time.perf_counter() - started
        await pool.execute(f"DROP TABLE {table}")
        return sum(counts) / elapsed
    finally:
        await pool.close()


async def notify_rtt_us(database_url: str, rounds: int = 500) -> float:
    channel = f"bench_{uuid.uuid4().hex[:8]}"
    listener = await asyncpg.connect(database_url, timeout=10)
    sender = await asyncpg.connect(database_url, timeout=10)
    try:
        heard: asyncio.Queue[float] = asyncio.Queue()
        await listener.add_listener(
            channel, lambda *_: heard.put_nowait(time.perf_counter())
        )
        samples = []
        for _ in range(rounds):
            sent = time.perf_counter()
            await sender.execute(f"NOTIFY {channel}")
            arrived = await asyncio.wait_for(heard.get(), timeout=5)
            samples.append((arrived - sent) * 1e6)
        return statistics.median(samples)
    finally:
        await listener.close()
        await sender.close()


async def asgi_requests_per_s(
    port: int, connections: int = 32, seconds: float = 3.0
) -> float:
    """Requests per second from ``uvicorn bench.asgi_app:app`` on ``port``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(  # noqa: ASYNC220 (started once, before any load)
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.asgi_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--lifespan",
            "off",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=ROOT,
    )
    try:
        await _wait_listening(port, timeout=15)
        request = http1.prepare("GET", "/", f"127.0.0.1:{port}")
        stop = time.perf_counter() + seconds
        counts = [0] * connections

        async def client(index: int) -> None:
            conn = http1.Connection("127.0.0.1", port)
            try:
                # One deadline for the loop: a timer per request would cost the
                # client more than the server's answer.
                async with asyncio.timeout(seconds + 10):
                    while time.perf_counter() < stop:
                        response = await conn.send(request)
                        if response.status != 200:
                            raise RuntimeError(
                                f"bare ASGI answered {response.status}, not 200"
                            )
                        counts[index] += 1
            finally:
                conn.close()

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(connections)))
        return sum(counts) / (time.perf_counter() - started)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


async def _wait_listening(port: int, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.perf_counter() > deadline:
                raise
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return


async def measure(database_url: str, amqp_url: str, asgi_port: int) -> dict[str, float]:
    """All four, one after the other so they do not compete."""
    return {
        "broker_msgs_per_s": round(await broker_msgs_per_s(amqp_url), 1),
        "pg_commits_per_s": round(await pg_commits_per_s(database_url), 1),
        "notify_rtt_us": round(await notify_rtt_us(database_url), 1),
        "asgi_requests_per_s": round(await asgi_requests_per_s(asgi_port), 1),
    }
