"""What one request costs a server that was asleep, against one kept busy.

The pipeline is a chain of processes that mostly wait on each other: every database
statement, publish, confirm and ack wakes one. This script serves the bench's bare
ASGI app (``bench/asgi_app.py``) under uvicorn and sends it requests one at a time,
first with a pause after each (the server goes back to sleep every time), then back
to back, and prints the server's CPU time per request (utime + stime from
``/proc``) and the round trip for both. The difference is the price of a wake-up
on this machine, paid on each hop of the pipeline that finds its process idle.

    uv run --no-sync python bench/wakeup_cost.py
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import http1, system
from tests.support.processes import free_port

REQUESTS = 400
PAUSE_S = 0.03


def _cpu_ms(pid: int) -> float:
    value = system.cpu_ms(pid)
    if value is None:
        raise RuntimeError(f"the server (pid {pid}) is gone")
    return value


async def _measure(url: str, pid: int, pause: float) -> tuple[float, float]:
    """(median round trip ms, server CPU ms per request)."""
    async with http1.Pool(url, 1) as pool:
        head = pool.prepare("GET", "/")
        for _ in range(50):
            await pool.send(head)
        times = []
        before = _cpu_ms(pid)
        for _ in range(REQUESTS):
            started = time.perf_counter()
            await pool.send(head)
            times.append((time.perf_counter() - started) * 1000)
            if pause:
                await asyncio.sleep(pause)
        spent = _cpu_ms(pid) - before
    times.sort()
    return times[len(times) // 2], spent / REQUESTS


def main() -> None:
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.asgi_app:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                asyncio.run(_measure_once(url))
                break
            except (OSError, http1.RequestFailed):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        asleep = asyncio.run(_measure(url, server.pid, PAUSE_S))
        busy = asyncio.run(_measure(url, server.pid, 0.0))
    finally:
        server.terminate()
        server.wait(10)
    print(f"{REQUESTS} requests each way to a bare ASGI app under uvicorn")
    print(
        f"  asleep between requests: round trip {asleep[0]:.3f} ms, "
        f"server CPU {asleep[1]:.3f} ms a request"
    )
    print(
        f"  back to back:            round trip {busy[0]:.3f} ms, "
        f"server CPU {busy[1]:.3f} ms a request"
    )
    print(f"  a wake-up costs the server about {asleep[1] - busy[1]:.3f} ms of CPU")


async def _measure_once(url: str) -> None:
    async with http1.Pool(url, 1, timeout=2) as pool:
        await pool.send(pool.prepare("GET", "/"))


if __name__ == "__main__":
    main()
