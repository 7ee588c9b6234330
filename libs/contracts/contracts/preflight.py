"""Start-up checks that turn "connection refused" into instructions.

A service that cannot reach PostgreSQL or RabbitMQ says which one, at which address,
and how to start it, then exits with status 2 instead of printing a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shlex
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
import aiormq
import asyncpg

from contracts.settings import (
    Settings,
    amqp_connection_name,
    amqp_options,
    redact_url,
)

PG_HINT = (
    "start it with: pg_ctlcluster --skip-systemctl-redirect "
    "$(ls /etc/postgresql) main start   (or set NOTIFLOW_DATABASE_URL)"
)
AMQP_HINT = "start it with: rabbitmq-server -detached   (or set NOTIFLOW_AMQP_URL)"

# The same directory as ``contracts.migrate.MIGRATIONS``, named here so that a
# service's start-up does not import yoyo and psycopg only to list file names.
MIGRATIONS = Path(__file__).with_name("migrations")
# Where yoyo records each applied migration, one row per file stem in
# ``migration_id`` (yoyo's default table, which ``contracts.migrate`` keeps).
APPLIED_SQL = (
    "SELECT EXISTS (SELECT FROM unnest($1::text[]) AS name "
    "WHERE to_regclass(name) IS NOT NULL), "
    "array(SELECT migration_id FROM _yoyo_migration), "
    "array(SELECT name FROM unnest($1::text[]) AS name WHERE to_regclass(name) IS NULL)"
)
# Every table the migrations create, which every release since has: one dropped
# by hand fails whatever reads it, though the migrations say it is there.
TABLES = (
    "users",
    "posts",
    "comments",
    "idempotency_keys",
    "events",
    "notifications",
    "notification_preferences",
    "inbox_sequences",
    "outbox",
    "push_subscriptions",
    "comment_pace",
)

logger = logging.getLogger(__name__)


@functools.cache
def known_migrations(directory: Path = MIGRATIONS) -> frozenset[str]:
    """The ids yoyo gives the migrations this code ships: their file stems."""
    return frozenset(
        path.name.removesuffix(".sql")
        for path in directory.glob("*.sql")
        if not path.name.endswith(".rollback.sql")
    )


def schema_problem(
    where: str,
    has_tables: bool,
    applied: set[str],
    *,
    quiet: bool = False,
    missing_tables: Sequence[str] = (),
) -> str | None:
    """Why a database whose migrations are ``applied`` cannot serve this code.

    Migrations the code does not know are let through: a rolling upgrade runs
    the newer release's migrations while the older services still run. They
    are logged unless ``quiet``, for a check that runs every few seconds.
    """
    if not has_tables:
        return (
            f"the database at {where} has no notiflow tables; apply the "
            "migrations with `make migrate` (notiflow-migrate)"
        )
    known = known_migrations()
    if missing := sorted(known - applied):
        return (
            f"the database at {where} lacks migration(s) {', '.join(missing)}; "
            "apply them with `make migrate` (notiflow-migrate)"
        )
    if missing_tables:
        return (
            f"the database at {where} lacks table(s) {', '.join(missing_tables)}, "
            "though its migrations are applied: restore them from a backup, or "
            "migrate a new database"
        )
    if (newer := sorted(applied - known)) and not quiet:
        logger.info(
            "the database at %s has migration(s) this release does not know: %s",
            where,
            ", ".join(newer),
        )
    return None


def _reachable(url: str, default_port: int, timeout: float = 3.0) -> str | None:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except ConnectionResetError:
        # Something listens there and hung up at once; the next check, which
        # speaks the protocol, says what. (A busy machine can report the hang-up
        # to connect() itself.)
        return None
    except OSError as exc:
        return exc.strerror or str(exc)


def problems(
    settings: Settings,
    *,
    database: bool = True,
    broker: bool = True,
    migrated: bool = False,
) -> list[str]:
    """What stops a service from starting; with ``migrated``, a missing schema too."""
    found = []
    if database:
        if err := _reachable(settings.database_url, 5432):
            found.append(
                f"PostgreSQL is not reachable at {redact_url(settings.database_url)} "
                f"({err}); {PG_HINT}"
            )
        elif err := asyncio.run(
            _postgres(settings.database_url, migrated, settings.db_pool_min)
        ):
            found.append(err)
    if broker:
        if err := _reachable(settings.amqp_url, 5672):
            found.append(
                f"RabbitMQ is not reachable at {redact_url(settings.amqp_url)} "
                f"({err}); {AMQP_HINT}"
            )
        elif err := asyncio.run(_rabbitmq(settings.amqp_url)):
            found.append(err)
    return found


def _scrubbed(text: str, url: str) -> str:
    """``text`` with the password of ``url`` blanked, should a library repeat it."""
    password = urlsplit(url).password
    for secret in {password, unquote(password)} if password else ():
        text = text.replace(secret, "***")
    return text


async def _postgres(url: str, migrated: bool, pool_min: int = 0) -> str | None:
    """Log in, to tell a refused user or a missing database from a running server;
    and see that the server could ever give the pool its ``pool_min`` connections."""
    where = redact_url(url)
    target = url if migrated else urlunsplit(urlsplit(url)._replace(path="/postgres"))
    try:
        conn = await asyncpg.connect(target, timeout=5)
    except ValueError as exc:
        # asyncpg reads the URL's query (sslmode and the like) only here.
        return f"invalid setting NOTIFLOW_DATABASE_URL: {_scrubbed(str(exc), url)}"
    except asyncpg.InvalidCatalogNameError:
        return (
            f"the database at {where} does not exist; create and migrate it with "
            "`make migrate` (notiflow-migrate)"
        )
    except (
        asyncpg.InvalidPasswordError,
        asyncpg.InvalidAuthorizationSpecificationError,
    ) as exc:
        return f"PostgreSQL at {where} refused the login: {_scrubbed(str(exc), url)}"
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return (
            f"PostgreSQL at {where} did not accept a connection: "
            f"{_scrubbed(repr(exc), url)}"
        )
    try:
        if (problem := await _room_for(conn, pool_min)) is not None:
            return problem
        return await missing_schema(conn, where) if migrated else None
    finally:
        await conn.close()


async def _room_for(conn: asyncpg.Connection, pool_min: int) -> str | None:
    """Why a pool opening ``pool_min`` connections at start never could, if so.

    Only a server that takes fewer connections in all is judged: how many other
    clients hold is for the moment, and a pool waits for room once it runs.
    """
    most = await conn.fetchval("SELECT current_setting('max_connections')::int")
    if pool_min <= most:
        return None
    return (
        f"NOTIFLOW_DB_POOL_MIN ({pool_min}) connections are opened at start, and "
        f"this PostgreSQL server takes at most {most} in all (max_connections); "
        "lower NOTIFLOW_DB_POOL_MIN"
    )


async def missing_schema(
    conn: asyncpg.Connection,
    where: str,
    *,
    quiet: bool = False,
    timeout: float | None = None,
) -> str | None:
    """Why the database ``conn`` is connected to (shown as ``where``) lacks the
    schema this code needs, or None if it has it."""
    missing: list[str] = []
    try:
        has_tables, applied, missing = await conn.fetchrow(
            APPLIED_SQL, list(TABLES), timeout=timeout
        )
    except asyncpg.UndefinedTableError:
        # yoyo never ran here: whatever tables exist, no migration is recorded.
        has_tables = await conn.fetchval(
            "SELECT EXISTS (SELECT FROM unnest($1::text[]) AS name "
            "WHERE to_regclass(name) IS NOT NULL)",
            list(TABLES),
            timeout=timeout,
        )
        applied = []
    return schema_problem(
        where, bool(has_tables), set(applied), quiet=quiet, missing_tables=missing
    )


def _amqp_user(url: str) -> str | None:
    """The user ``url`` logs in as (the clients take guest when it names none), or
    None with ``auth=external``, where the client certificate names the user."""
    if amqp_options(url).get("auth", "").lower() == "external":
        return None
    username = urlsplit(url).username
    return unquote(username) if username else "guest"


# How long the start-up check waits for RabbitMQ to log it in.
LOGIN_SECONDS = 5


async def _rabbitmq(url: str) -> str | None:
    """Log in, to tell wrong credentials or a missing vhost from a running broker."""
    where = redact_url(url)
    try:
        connection = await aio_pika.connect(
            url,
            timeout=LOGIN_SECONDS,
            client_properties={
                "connection_name": amqp_connection_name(url, "start-up check")
            },
        )
    except aiormq.exceptions.ProbableAuthenticationError:
        return (
            f"RabbitMQ at {where} refused the user name or password "
            "(set them in NOTIFLOW_AMQP_URL)"
        )
    except TimeoutError:
        return (
            f"RabbitMQ at {where} accepted the connection but did not answer within "
            f"{LOGIN_SECONDS} s: a broker still starting or overloaded, or a network "
            "or proxy on the way that has stopped passing traffic"
        )
    except ConnectionError as exc:
        # Closed before any AMQP answer; a broker refusing a virtual host or a
        # user answers in AMQP instead (below).
        return (
            f"RabbitMQ at {where} closed the connection before the login "
            f"({_scrubbed(str(exc), url)}): a broker starting or stopping, or "
            "something other than RabbitMQ listening on that port"
        )
    except Exception as exc:
        vhost = unquote(urlsplit(url).path.lstrip("/")) or "/"
        user = _amqp_user(url)
        who = repr(user) if user else "the user your client certificate names"
        return (
            f"RabbitMQ at {where} refused the connection ({type(exc).__name__}); "
            f"check that the virtual host {vhost!r} exists and that {who} may "
            f"use it: rabbitmqctl add_vhost {shlex.quote(vhost)} && rabbitmqctl "
            f"set_permissions -p {shlex.quote(vhost)} "
            f'{shlex.quote(user) if user else "USER"} ".*" ".*" ".*"'
        )
    await connection.close()
    return None


def require_services(
    settings: Settings,
    *,
    database: bool = True,
    broker: bool = True,
    migrated: bool = False,
) -> None:
    found = problems(settings, database=database, broker=broker, migrated=migrated)
    if found:
        for line in found:
            print(f"notiflow: {line}", file=sys.stderr)
        sys.exit(2)
