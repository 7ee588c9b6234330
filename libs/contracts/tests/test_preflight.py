"""Start-up checks name what is missing, where, and what to do about it."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import psycopg
import pytest

from contracts import migrate
from contracts.preflight import problems, require_services
from contracts.settings import Settings
from tests.support import infra

pytestmark = pytest.mark.integration


def test_a_closed_port_is_named_with_how_to_start_the_server() -> None:
    settings = Settings(
        database_url="postgresql://postgres:pw@127.0.0.1:1/x",
        amqp_url="amqp://guest:secret@127.0.0.1:1/",
    )

    pg, mq = problems(settings)

    assert (
        "PostgreSQL is not reachable at postgresql://postgres:***@127.0.0.1:1/x" in pg
    )
    assert "pg_ctlcluster" in pg
    assert "RabbitMQ is not reachable at amqp://guest:***@127.0.0.1:1/" in mq
    assert "rabbitmq-server -detached" in mq
    assert "pw" not in pg and "secret" not in mq


def test_a_missing_vhost_and_wrong_password_are_told_apart(amqp_url: str) -> None:
    missing = amqp_url + "_gone"
    wrong = amqp_url.replace("guest:guest@", "guest:wrong@")

    [no_vhost] = problems(Settings(amqp_url=missing), database=False)
    [refused] = problems(Settings(amqp_url=wrong), database=False)

    assert "virtual host" in no_vhost and "rabbitmqctl add_vhost" in no_vhost
    assert "refused the user name or password" in refused
    assert problems(Settings(amqp_url=amqp_url), database=False) == []


@contextmanager
def listening(answer: Callable[[socket.socket], None]) -> Iterator[int]:
    """A TCP server on 127.0.0.1 that does ``answer`` with each connection; its
    port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    held: list[socket.socket] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            held.append(conn)
            answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        done.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def _silent(conn: socket.socket) -> None:
    """Say nothing: the connection is held open until the server stops."""


def _hang_up(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def test_a_broker_port_that_never_answers_is_told_from_a_refused_vhost() -> None:
    with listening(_silent) as port:
        [silent] = problems(
            Settings(amqp_url=f"amqp://guest:secret@127.0.0.1:{port}/notiflow"),
            database=False,
        )

    assert silent == (
        f"RabbitMQ at amqp://guest:***@127.0.0.1:{port}/notiflow accepted the "
        "connection but did not answer within 5 s: a broker still starting or "
        "overloaded, or a network or proxy on the way that has stopped passing "
        "traffic"
    )


def test_a_broker_port_that_hangs_up_is_told_from_a_refused_vhost() -> None:
    with listening(_hang_up) as port:
        [closed] = problems(
            Settings(amqp_url=f"amqp://guest:secret@127.0.0.1:{port}/notiflow"),
            database=False,
        )

    assert closed.startswith(
        f"RabbitMQ at amqp://guest:***@127.0.0.1:{port}/notiflow closed the "
        "connection before the login ("
    )
    assert closed.endswith(
        "): a broker starting or stopping, or something other than RabbitMQ "
        "listening on that port"
    )
    assert "virtual host" not in closed and "secret" not in closed


@pytest.fixture
def stranger() -> Iterator[str]:
    """A user RabbitMQ knows, with the password "pw", that may use no vhost."""
    name = infra.create_user("pw")
    try:
        yield name
    finally:
        infra.delete_user(name)


def test_a_refused_vhost_is_told_with_the_command_for_the_urls_own_user(
    amqp_url: str, stranger: str
) -> None:
    vhost = urlsplit(amqp_url).path.lstrip("/")
    url = amqp_url.replace("guest:guest@", f"{stranger}:pw@")

    [refused] = problems(Settings(amqp_url=url), database=False)

    assert f"that {stranger!r} may use it" in refused
    assert f'set_permissions -p {vhost} {stranger} ".*" ".*" ".*"' in refused


def test_a_service_needs_a_migrated_database() -> None:
    name = infra.unique("notiflow_pre")
    absent = Settings(database_url=infra.database_url(name))

    [missing] = problems(absent, broker=False, migrated=True)

    assert "does not exist" in missing and "make migrate" in missing
    assert problems(absent, broker=False) == [], "migrate itself only needs a login"


def test_a_url_option_the_driver_refuses_is_named_without_the_password() -> None:
    with_password = infra.PG_URL.replace("://postgres@", "://postgres:hunter22@")
    settings = Settings(database_url=f"{with_password}/x?sslmode=bogus")

    [refused] = problems(settings, broker=False)

    assert refused.startswith("invalid setting NOTIFLOW_DATABASE_URL: `sslmode`")
    assert "hunter22" not in refused


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = infra.unique("notiflow_pre")
    try:
        yield infra.database_url(name)
    finally:
        asyncio.run(infra.drop_database(name))


def test_a_database_missing_a_migration_is_refused_naming_it(
    empty_database: str,
) -> None:
    infra.migrate_before(empty_database, "0004")

    [missing] = problems(
        Settings(database_url=empty_database), broker=False, migrated=True
    )

    assert "0004_inbox_unread_count" in missing
    assert "0003" not in missing, "only what is missing is named"
    assert "notiflow-migrate" in missing and "make migrate" in missing


def test_a_service_exits_2_with_one_line_on_a_database_missing_a_migration(
    empty_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    infra.migrate_before(empty_database, "0004")

    with pytest.raises(SystemExit) as refused:
        require_services(
            Settings(database_url=empty_database), broker=False, migrated=True
        )

    assert refused.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("notiflow: ") and "0004_inbox_unread_count" in line


def test_a_database_with_every_migration_passes(empty_database: str) -> None:
    migrate.apply(empty_database)

    assert (
        problems(Settings(database_url=empty_database), broker=False, migrated=True)
        == []
    )


def test_a_database_a_newer_release_migrated_further_passes(
    empty_database: str,
) -> None:
    migrate.apply(empty_database)
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO _yoyo_migration "
            "(migration_hash, migration_id, applied_at_utc) "
            "VALUES ('next', '9999_from_a_newer_release', now())"
        )

    assert (
        problems(Settings(database_url=empty_database), broker=False, migrated=True)
        == []
    )


def test_a_database_yoyo_never_ran_on_is_told_to_migrate(empty_database: str) -> None:
    migrate.ensure_database(empty_database)

    [missing] = problems(
        Settings(database_url=empty_database), broker=False, migrated=True
    )

    assert "has no notiflow tables" in missing and "make migrate" in missing


def test_a_database_whose_migrations_were_rolled_back_is_told_to_migrate(
    empty_database: str,
) -> None:
    migrate.apply(empty_database)
    migrate.rollback_all(empty_database)

    [missing] = problems(
        Settings(database_url=empty_database), broker=False, migrated=True
    )

    assert "has no notiflow tables" in missing and "make migrate" in missing


def test_a_pool_larger_than_the_server_takes_is_refused_naming_the_setting(
    empty_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    migrate.apply(empty_database)
    with psycopg.connect(empty_database) as conn:
        most = int(conn.execute("SHOW max_connections").fetchone()[0])
    settings = Settings(
        database_url=empty_database, db_pool_min=most + 1, db_pool_max=most + 1
    )

    with pytest.raises(SystemExit) as refused:
        require_services(settings, broker=False, migrated=True)

    assert refused.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert f"NOTIFLOW_DB_POOL_MIN ({most + 1})" in line
    assert f"at most {most}" in line
    assert problems(Settings(database_url=empty_database), broker=False) == []
