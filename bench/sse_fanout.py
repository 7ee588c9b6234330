"""Idle event streams held by one gateway process, and one notification to all of them.

``uv run python -m bench.sse_fanout --connections 10000`` starts an sse-gateway on a
private database and virtual host, opens N idle streams for one user, reads the
server's resident memory (``VmRSS``) before and after, then delivers one notification
to that user and times how long until every stream has it. It runs twice by default:
once with sse-starlette's stock response (``NOTIFLOW_SSE_LEAN=false``: four tasks a
stream) and once with the gateway's own (one helper task a stream), so the two can
be compared on the same machine.

The client is a minimal HTTP/1.1 reader on asyncio streams; it shares the machine's
cores with the server, so the fan-out time includes the client noticing the event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from comments.seed import seed
from contracts.auth import issue_token
from contracts.settings import Settings
from tests.sse import helpers
from tests.support import infra
from tests.support.processes import Service

EVENT_MARK = b"event: notification"


@dataclass
class Result:
    mode: str
    connections: int
    held: int
    rss_before_kib: int
    rss_after_kib: int
    tasks: int
    connect_s: float
    fanout_s: float

    @property
    def per_connection_kib(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / max(self.connections, 1)

    def line(self) -> str:
        return (
            f"{self.mode:>6}: {self.held:>6} streams held, "
            f"{self.per_connection_kib:5.1f} KiB RSS each "
            f"({self.rss_before_kib // 1024} → {self.rss_after_kib // 1024} MiB), "
            f"{self.tasks} asyncio tasks, opened in {self.connect_s:.1f} s, "
            f"fan-out to all in {self.fanout_s * 1000:.0f} ms"
        )


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        raise SystemExit(f"need {needed} open files, the hard limit allows {soft}")


class Stream:
    """One idle SSE connection, reading only to notice the notification."""

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.got_at: float | None = None

    async def open(self, port: int, token: str) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.writer.write(
            (
                "GET /sse HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {token}\r\n"
                "Accept: text/event-stream\r\n\r\n"
            ).encode()
        )
        await asyncio.wait_for(self.reader.readuntil(b": connected"), timeout=60)

    async def wait_event(self) -> None:
        assert self.reader is not None
        await self.reader.readuntil(EVENT_MARK)
        self.got_at = time.perf_counter()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def measure(
    mode: str, connections: int, settings: Settings, user_id: int, log_dir: Path
) -> Result:
    gateway = Service(
        "sse-gateway",
        {
            "NOTIFLOW_ENV": "test",
            "NOTIFLOW_DATABASE_URL": settings.database_url,
            "NOTIFLOW_AMQP_URL": settings.amqp_url,
            "NOTIFLOW_LOG_LEVEL": "WARNING",
            "NOTIFLOW_SSE_LEAN": "true" if mode == "lean" else "false",
        },
        log_dir,
    ).start()
    streams: list[Stream] = []
    try:
        await asyncio.to_thread(gateway.wait_ready)
        assert gateway.proc is not None
        pid = gateway.proc.pid
        token = issue_token(user_id, "bob", settings)

        # Warm the code paths once, so the baseline includes them.
        warm = Stream()
        await warm.open(gateway.port, token)
        warm.close()
        await asyncio.sleep(0.5)
        before = rss_kib(pid)

        started = time.perf_counter()
        slots = asyncio.Semaphore(200)

        async def open_one() -> Stream:
            async with slots:
                stream = Stream()
                await stream.open(gateway.port, token)
                return stream

        streams = list(await asyncio.gather(*(open_one() for _ in range(connections))))
        connect_s = time.perf_counter() - started
        await asyncio.sleep(1.0)
        after = rss_kib(pid)
        gauges = await helpers.gauges(gateway.url)

        waiters = [asyncio.create_task(s.wait_event()) for s in streams]
        await asyncio.sleep(0.2)  # every reader is parked in readuntil
        async with helpers.database(settings.database_url) as pg:
            notification_id = await helpers.add(pg, user_id, "fan-out")
            sent = time.perf_counter()
            await helpers.deliver(pg, notification_id)
        await asyncio.wait_for(asyncio.gather(*waiters), timeout=120)
        last = max(s.got_at or sent for s in streams)
        return Result(
            mode=mode,
            connections=connections,
            held=int(gauges.get("notiflow_sse_connections", 0)),
            rss_before_kib=before,
            rss_after_kib=after,
            tasks=int(gauges.get("notiflow_sse_asyncio_tasks", 0)),
            connect_s=connect_s,
            fanout_s=last - sent,
        )
    finally:
        for stream in streams:
            stream.close()
        await asyncio.to_thread(gateway.stop)


async def main_async(args: argparse.Namespace) -> None:
    raise_fd_limit(args.connections + 1000)
    template = infra.create_template()
    vhost = infra.create_vhost()
    settings = Settings(
        env="test",
        database_url=infra.database_url(template),
        amqp_url=infra.amqp_url(vhost),
    )
    try:
        await seed(settings.database_url)
        conn = await asyncpg.connect(settings.database_url, timeout=10)
        try:
            bob = await conn.fetchval("SELECT id FROM users WHERE username = 'bob'")
        finally:
            await conn.close()
        with tempfile.TemporaryDirectory(prefix="sse-fanout-") as tmp:
            for mode in args.modes:
                result = await measure(mode, args.connections, settings, bob, Path(tmp))
                print(result.line(), flush=True)
    finally:
        with contextlib.suppress(Exception):
            infra.delete_vhost(vhost)
        await infra.drop_database(template)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument(
        "--mode",
        dest="modes",
        action="append",
        choices=["stock", "lean"],
        help="which stream response to measure; both when omitted",
    )
    args = parser.parse_args(argv)
    args.modes = args.modes or ["stock", "lean"]
    os.environ.setdefault("NOTIFLOW_ENV", "test")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
