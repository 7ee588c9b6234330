"""``notiflow-migrate`` creates and migrates the database the services use, once,
however many runs start together, and says in one line why it cannot."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import asyncpg
import psycopg
import pytest
from pydantic import ValidationError

from contracts import migrate
from contracts.preflight import MIGRATIONS, TABLES, known_migrations
from contracts.settings import Settings, describe, redact_url
from tests.support import infra

pytestmark = pytest.mark.integration

MIGRATE = str(Path(sys.executable).with_name("notiflow-migrate"))
NO_DATABASE = (
    "notiflow: invalid setting NOTIFLOW_DATABASE_URL: names no database; add one, "
    "as in postgresql://user:password@host:5432/notiflow"
)


def run(command: list[str], database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        env={"PATH": "/usr/bin:/bin", "NOTIFLOW_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def fresh_name() -> Iterator[str]:
    """A database name nothing uses yet, dropped at the end of the test."""
    name = infra.unique("notiflow_mig")
    try:
        yield name
    finally:
        asyncio.run(infra.drop_database(name))


def applied_once(url: str) -> dict[str, int]:
    async def counts() -> dict[str, int]:
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch(
                "SELECT migration_id, count(*) AS n FROM _yoyo_log "
                "WHERE operation = 'apply' GROUP BY migration_id"
            )
        finally:
            await conn.close()
        return {row["migration_id"]: row["n"] for row in rows}

    return asyncio.run(counts())


WAITING_TO_CREATE = """
SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)
WHERE relation = 'pg_database'::regclass AND NOT granted AND application_name = %s
"""


def test_runs_started_together_on_a_missing_database_all_create_and_migrate_it(
    fresh_name: str,
) -> None:
    # The runs' connections carry the database's name, to tell their waits
    # from those of other tests creating databases meanwhile.
    url = f"{infra.database_url(fresh_name)}?application_name={fresh_name}"
    # Holding pg_database lets each run find the database missing, then stops
    # every CREATE DATABASE until all three are there: the race replicas'
    # init containers run into when they start together.
    with psycopg.connect(infra.database_url("postgres")) as blocker:
        blocker.execute("LOCK TABLE pg_database IN SHARE MODE")
        runs = [
            subprocess.Popen(
                [MIGRATE],
                env={"PATH": "/usr/bin:/bin", "NOTIFLOW_DATABASE_URL": url},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        with psycopg.connect(infra.database_url("postgres"), autocommit=True) as watch:
            for _ in range(600):
                (waiting,) = watch.execute(WAITING_TO_CREATE, (fresh_name,)).fetchone()
                if waiting == 3 or any(r.poll() is not None for r in runs):
                    break
                time.sleep(0.1)
        blocker.commit()
    outcomes = [(r.wait(timeout=120), *r.communicate()) for r in runs]

    for status, out, err in outcomes:
        assert (status, err) == (0, ""), err
        assert out.startswith("applied ")
    assert applied_once(url) == dict.fromkeys(known_migrations(), 1)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres:hunter22@127.0.0.1:5432/",
        "postgresql://postgres:hunter22@127.0.0.1:5432",
        "postgresql://postgres:hunter22@127.0.0.1:5432/?sslmode=disable",
    ],
)
def test_a_database_url_naming_no_database_stops_migrate_in_one_line(
    url: str,
) -> None:
    done = run([MIGRATE], url)

    assert done.returncode == 2
    assert done.stderr.splitlines() == [NO_DATABASE]
    assert "hunter22" not in done.stderr + done.stdout


def test_a_database_url_naming_no_database_stops_a_service_in_one_line() -> None:
    # The services would connect to the database named after the user, and
    # send the operator to notiflow-migrate, which cannot migrate that one.
    done = run(
        [sys.executable, "-m", "comments"],
        "postgresql://postgres:hunter22@127.0.0.1:5432/",
    )

    assert done.returncode == 2
    assert done.stderr.splitlines() == [NO_DATABASE]
    assert "hunter22" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:hunter22@h:5432/notiflow?dbname=other",
        "postgresql://u:hunter22@h:5432?dbname=notiflow",
        "postgresql://u:hunter22@h:5432/?database=notiflow",
    ],
)
def test_a_database_named_in_the_query_is_refused_naming_the_path(url: str) -> None:
    # asyncpg and libpq read these as two different databases.
    with pytest.raises(ValidationError) as refused:
        Settings(database_url=url)

    text = describe(refused.value)
    assert text == (
        "NOTIFLOW_DATABASE_URL: names the database in its query; name it in the "
        "path instead, as in postgresql://user:password@host:5432/notiflow"
    )
    assert "hunter22" not in text


@pytest.mark.parametrize("suffix", ["_n%C3%B6", '_q"uote', "_sp%20ace"])
def test_migrate_creates_and_migrates_the_database_the_services_connect_to(
    fresh_name: str, suffix: str
) -> None:
    written = infra.database_url(fresh_name + suffix)
    decoded = fresh_name + unquote(suffix)
    url = Settings(database_url=written).database_url

    try:
        assert migrate.apply(url) == len(known_migrations())
        assert applied_once(url) == dict.fromkeys(known_migrations(), 1)
    finally:
        asyncio.run(infra.drop_database(decoded.replace('"', '""')))


def test_rolling_back_a_database_that_does_not_exist_says_so_in_one_line(
    fresh_name: str,
) -> None:
    url = infra.database_url(fresh_name)
    done = run([MIGRATE, "--rollback-all", "--confirm", fresh_name], url)

    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(f"notiflow: migrating {redact_url(url)} failed: ")
    assert f'database "{fresh_name}" does not exist' in line


def test_rolling_back_asks_for_the_database_name_and_drops_nothing_without_it(
    fresh_name: str,
) -> None:
    empty_database = infra.database_url(fresh_name)
    migrate.apply(empty_database)
    name = migrate.database_name(empty_database)

    unconfirmed = run([MIGRATE, "--rollback-all"], empty_database)
    mistaken = run([MIGRATE, "--rollback-all", "--confirm", "other"], empty_database)
    hedged = run(
        [MIGRATE, "--rollback-all", "--confirm", "other", "--confirm", name],
        empty_database,
    )
    shortened = run([MIGRATE, "--roll", "--conf", name], empty_database)
    kept = applied_once(empty_database)
    confirmed = run([MIGRATE, "--rollback-all", "--confirm", name], empty_database)

    for refused in (unconfirmed, mistaken):
        assert refused.returncode == 2
        [line] = refused.stderr.splitlines()
        assert "drops every notiflow table" in line
        assert line.endswith(f"run it again with --confirm {name}")
    assert hedged.returncode == shortened.returncode == 2
    assert "unrecognized arguments: --roll --conf" in shortened.stderr
    assert "--confirm: given more than once" in hedged.stderr
    assert kept == dict.fromkeys(known_migrations(), 1)
    assert confirmed.returncode == 0, confirmed.stderr
    assert confirmed.stdout.startswith(f"rolled back {len(known_migrations())} ")


def test_the_readiness_check_knows_every_table_the_migrations_create() -> None:
    created = {
        match
        for path in MIGRATIONS.glob("*.sql")
        if not path.name.endswith(".rollback.sql")
        for match in re.findall(r"CREATE TABLE (\w+)", path.read_text())
    }

    assert set(TABLES) == created
