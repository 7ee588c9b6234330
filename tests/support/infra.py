"""Private PostgreSQL databases and RabbitMQ virtual hosts for tests.

Every test that touches PostgreSQL gets a database of its own, cloned from a
template that carries the migrations (cloning takes milliseconds; migrating takes
longer). Every test that touches RabbitMQ gets a virtual host of its own, so queue
names never collide between tests or between concurrent runs. Both are dropped at the
end of the test, whatever its outcome.

Virtual hosts are made and removed a few at a time. Each ``rabbitmqctl`` call starts
an Erlang node of its own, which costs half a second or more, and a test used to
need three (add the host, grant the guest user, delete the host): with hundreds of
tests that was the largest part of the suite's time. One ``rabbitmqctl eval`` now
adds :data:`VHOST_BATCH` hosts with their permissions, and one removes as many
finished ones; a finished host waits for that call with nothing connected to it.
Where the broker does not take those calls (another RabbitMQ version), each host is
added and deleted on its own as before.
"""

from __future__ import annotations

import atexit
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


# Virtual hosts added and not yet handed out, and those handed back, this process's.
VHOST_BATCH = 8
_stock: list[str] = []
_finished: list[str] = []
_ACTOR = '<<"notiflow-tests">>'
# None until the first batch says whether ``rabbitmqctl eval`` can be used.
_batched: bool | None = None


def _binaries(names: list[str]) -> str:
    return "[" + ", ".join(f'<<"{name}">>' for name in names) + "]"


def _add_vhosts(names: list[str]) -> None:
    """Add ``names`` with the guest user allowed everything, in one call."""
    any_ = '<<".*">>'
    _rabbitmqctl(
        "eval",
        f"[begin ok = rabbit_vhost:add(V, {_ACTOR}), "
        "ok = rabbit_auth_backend_internal:set_permissions("
        f'<<"guest">>, V, {any_}, {any_}, {any_}, {_ACTOR}) end '
        f"|| V <- {_binaries(names)}], ok.",
    )


def _delete_vhosts(names: list[str]) -> None:
    """Delete ``names`` in one call; one already gone is no error."""
    _rabbitmqctl(
        "eval",
        f"[catch rabbit_vhost:delete(V, {_ACTOR}) || V <- {_binaries(names)}], ok.",
    )


def create_vhost() -> str:
    """A new virtual host the guest user may use; :func:`delete_vhost` it after."""
    global _batched
    if not _stock and _batched is not False:
        names = [unique("notiflow_t") for _ in range(VHOST_BATCH)]
        try:
            _add_vhosts(names)
        except subprocess.CalledProcessError:
            if _batched:
                raise
            _batched = False
            # Some may have been added before the call failed.
            _delete_vhosts_one_by_one(names)
        else:
            if _batched is None:
                atexit.register(release_vhosts)
            _batched = True
            _stock.extend(names)
    if _stock:
        return _stock.pop()
    name = unique("notiflow_t")
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return name


def delete_vhost(name: str) -> None:
    """Delete a host :func:`create_vhost` gave, at once or with the next batch."""
    if not _batched:
        _rabbitmqctl("delete_vhost", name)
        return
    _finished.append(name)
    if len(_finished) >= VHOST_BATCH:
        _delete_vhosts(_finished)
        _finished.clear()


def release_vhosts() -> None:
    """Delete every host this process added and has not yet deleted."""
    left = _finished + _stock
    _finished.clear()
    _stock.clear()
    if left:
        _delete_vhosts(left)


def _delete_vhosts_one_by_one(names: list[str]) -> None:
    for name in names:
        try:
            _rabbitmqctl("delete_vhost", name)
        except subprocess.CalledProcessError:
            pass


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


def close_connections(vhost: str, name_ending: str) -> int:
    """Have the broker close each connection to ``vhost`` whose ``connection_name``
    ends with ``name_ending``, as a broker restart or a network fault would; how
    many it closed."""
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"

    def listing(*items: str, json_out: bool) -> str:
        formatter = ["--formatter", "json"] if json_out else ["--no-table-headers"]
        return subprocess.run(
            [ctl, "-q", "list_connections", *items, *formatter],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout

    # The JSON listing writes pids in a form close_connection does not take; the
    # plain one gives them, and the connection's name joins the two.
    wanted = set()
    for connection in json.loads(
        listing("name", "vhost", "client_properties", json_out=True) or "[]"
    ):
        properties = {key: value for key, _, value in connection["client_properties"]}
        if connection["vhost"] == vhost and str(
            properties.get("connection_name", "")
        ).endswith(name_ending):
            wanted.add(connection["name"])
    closed = 0
    for line in listing("pid", "name", json_out=False).splitlines():
        pid, _, name = line.partition("\t")
        if name in wanted:
            _rabbitmqctl("close_connection", pid, "closed by a test")
            closed += 1
    return closed


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
