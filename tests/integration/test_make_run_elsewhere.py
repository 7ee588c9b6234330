"""``make run`` pointed away from the default database and virtual host."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.support import infra

pytestmark = pytest.mark.integration

DEVRUN = Path(__file__).parents[2] / "tools" / "devrun.py"


async def _database_exists(name: str) -> bool:
    conn = await asyncpg.connect(infra.database_url("postgres"), timeout=10)
    try:
        return await conn.fetchval(
            "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)", name
        )
    finally:
        await conn.close()


def test_make_run_on_a_virtual_host_not_yet_made_says_how_and_creates_nothing(
    tmp_path: Path,
) -> None:
    database = infra.unique("notiflow_run")
    vhost = infra.unique("notiflow_run")

    # An empty --scripts makes a run that got past the checks stop at once.
    done = subprocess.run(
        [sys.executable, str(DEVRUN), "--scripts", str(tmp_path)],
        env={
            "PATH": "/usr/bin:/bin",
            "NOTIFLOW_DATABASE_URL": infra.database_url(database),
            "NOTIFLOW_AMQP_URL": infra.amqp_url(vhost),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert f"the virtual host '{vhost}' exists" in done.stderr
    assert f"rabbitmqctl add_vhost {vhost} " in done.stderr
    assert "PostgreSQL" not in done.stderr
    assert not asyncio.run(_database_exists(database))
