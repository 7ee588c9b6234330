"""Private PostgreSQL databases and RabbitMQ virtual hosts for tests.

Every test that touches PostgreSQL gets a database of its own, cloned from a
template that carries the migrations (cloning takes milliseconds; migrating takes
longer). Every test that touches RabbitMQ gets a virtual host of its own, so queue
names never collide between tests or between concurrent runs. Both are dropped at the
end of the test, whatever its outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from yoyo import get_backend, read_migrations

from contracts import migrate

PG_URL = os.environ.get("NOTIFLOW_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
AMQP_HOST = os.environ.get("NOTIFLOW_TEST_AMQP", "guest:guest@127.0.0.1:5672")


def _admin_url() -> str:
    return f"{PG_URL}/postgres"


def database_url(name: str) -> str:
    return f"{PG_URL}/{name}"


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def create_template() -> str:
    """A migrated database to clone test databases from."""
    name = unique("notiflow_tpl")
    migrate.apply(database_url(name))
    return name


async def create_database(template: str) -> str:
    name = unique("notiflow_t")
    conn = await asyncpg.connect(_admin_url(), timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(_admin_url(), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)


def create_vhost() -> str:
    name = unique("notiflow_t")
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return name


def delete_vhost(name: str) -> None:
    _rabbitmqctl("delete_vhost", name)


def connection_names(vhost: str) -> list[str]:
    """The ``connection_name`` client property of each connection open to ``vhost``
    (empty for one that gives none), sorted."""
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    # ``list_connections`` takes no ``-p``: it lists the whole broker's, so the
    # virtual host is one of the items asked for and filtered on here.
    listing = ["list_connections", "vhost", "client_properties"]
    done = subprocess.run(
        [ctl, "-q", *listing, "--formatter", "json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    names = []
    for connection in json.loads(done.stdout or "[]"):
        if connection["vhost"] != vhost:
            continue
        properties = {key: value for key, _, value in connection["client_properties"]}
        names.append(properties.get("connection_name", ""))
    return sorted(names)


def create_user(password: str) -> str:
    """A RabbitMQ user of the test's own, allowed into no virtual host."""
    name = unique("notiflow_u")
    _rabbitmqctl("add_user", name, password)
    return name


def delete_user(name: str) -> None:
    _rabbitmqctl("delete_user", name)


def amqp_url(vhost: str) -> str:
    return f"amqp://{AMQP_HOST}/{vhost}"


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def migrate_before(url: str, migration_id: str) -> None:
    """Migrate ``url`` as an older release would: every migration before one."""
    migrate.ensure_database(url)
    backend = get_backend(migrate._yoyo_url(url))
    try:
        every = read_migrations(str(migrate.MIGRATIONS))
        with backend.lock():
            backend.apply_migrations(
                backend.to_apply(every).filter(lambda m: m.id < migration_id)
            )
    finally:
        backend.connection.close()
