"""Reading the machine: CPU time per process from /proc, and what the machine is."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import aio_pika
import asyncpg

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float | None:
    """User plus system CPU time of ``pid`` (all its threads) in milliseconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; fields follow the last ")".
    fields = stat.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) * 1000 / TICKS_PER_S


def pids_named(comm: str) -> list[int]:
    """Processes whose command name is exactly ``comm`` (e.g. ``beam.smp``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == comm:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


async def backend_pids(conn: asyncpg.Connection) -> list[int]:
    """PostgreSQL backends serving the database of ``conn``, except ``conn``'s own."""
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return [r["pid"] for r in rows]


async def backends_by_client(conn: asyncpg.Connection) -> dict[str, list[int]]:
    """The backends of :func:`backend_pids`, grouped by the client's
    ``application_name`` (each notiflow service names its connections)."""
    rows = await conn.fetch(
        "SELECT pid, coalesce(nullif(application_name, ''), '?') AS name "
        "FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    groups: dict[str, list[int]] = {}
    for row in rows:
        groups.setdefault(row["name"], []).append(row["pid"])
    return groups


def snapshot(groups: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    """CPU milliseconds of every process in every named group, now."""
    out: dict[str, dict[int, float]] = {}
    for name, pids in groups.items():
        out[name] = {}
        for pid in pids:
            value = cpu_ms(pid)
            if value is not None:
                out[name][pid] = value
    return out


def spent(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
) -> dict[str, float]:
    """CPU milliseconds each group used between two snapshots.

    Only processes present in both count: a PostgreSQL backend that came or went in
    between is missed, which under-counts slightly rather than guessing.
    """
    used = {}
    for name, pids in before.items():
        later = after.get(name, {})
        used[name] = round(
            sum(later[pid] - ms for pid, ms in pids.items() if pid in later), 1
        )
    return used


async def describe(database_url: str, amqp_url: str) -> dict[str, object]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        pg_version = await conn.fetchval("SHOW server_version")
        autovacuum = await conn.fetchval("SHOW autovacuum")
    finally:
        await conn.close()
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        props = connection.transport.connection.server_properties
        rabbit = props.get("version", "unknown")
        rabbit = rabbit.decode() if isinstance(rabbit, bytes) else str(rabbit)
    finally:
        await connection.close()
    return {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(_mem_total_kib() / 1024 / 1024, 1),
        "postgresql": pg_version,
        "postgresql_autovacuum": autovacuum,
        "rabbitmq": rabbit,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0
