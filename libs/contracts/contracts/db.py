"""PostgreSQL helpers: pools with JSON codecs, bounded acquisition, clear errors."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TypeVar

import asyncpg

from contracts import logs
from contracts.settings import Settings

logger = logging.getLogger(__name__)

# Errors that mean "the database is not there right now", as opposed to a bug, when
# asyncpg raised them (see :func:`is_unavailable` for errors of unknown origin).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.TooManyConnectionsError,
)


# Errors raised while using a connection that mean it was lost, not that the SQL
# was wrong.
LOST_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # The server ending the session: a restart, a failover, an administrator.
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


# A table or column the code uses missing from the database: a migration rolled
# back, or a table renamed or restored under the running services. Like a database
# away, it passes once the schema is back; whatever waits for it loses nothing.
SCHEMA_MISSING_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.UndefinedTableError,
    asyncpg.UndefinedColumnError,
)

# Refusals a server gives for a while and then stops giving: a statement
# cancelled (by an operator, or past statement_timeout), a lock not had within
# lock_timeout, a database or server read-only (a failover, maintenance). The
# same statement goes through once they pass.
PASSING_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.QueryCanceledError,
    asyncpg.LockNotAvailableError,
    asyncpg.ReadOnlySQLTransactionError,
)

# Raised only by asyncpg: whoever raises them, the database is away.
_ASYNCPG_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.TooManyConnectionsError,
    *SCHEMA_MISSING_ERRORS,
    *PASSING_ERRORS,
)


class DatabaseUnavailable(Exception):
    """No connection could be had in time; HTTP answers 503, consumers back off."""


class OutcomeUnknown(DatabaseUnavailable):
    """A write was sent and the database did not say whether it committed (it
    went away, or answered past the command timeout): the client is told so,
    in ``detail``, rather than to simply try again."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.detail = detail


class PoolExhausted(DatabaseUnavailable):
    """Every connection of the pool stayed in use: the service is busy, the
    database may be answering well."""


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is away, rather than that the code is wrong.

    :class:`DatabaseUnavailable` and asyncpg's connection errors say so by their
    type. An ``OSError`` or a timeout (a refused connection, an unreachable host, a
    statement past its command timeout) says so only when asyncpg raised it: the
    same types from other code (a missing file, Jinja2's ``TemplateNotFound``) are
    bugs, and waiting for the database would not mend them.
    """
    if isinstance(exc, (DatabaseUnavailable, *_ASYNCPG_UNAVAILABLE)):
        return True
    return isinstance(exc, UNAVAILABLE_ERRORS) and _raised_in_asyncpg(exc)


def _raised_in_asyncpg(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _through_asyncpg(current.__traceback__):
            return True
        # A timeout around a statement (``asyncio.timeout``, ``wait_for``) ends it
        # by cancelling it; the cancellation's traceback shows what it cut short.
        following = current.__cause__ or current.__context__
        current = following if isinstance(following, asyncio.CancelledError) else None
    return False


def _through_asyncpg(tb: TracebackType | None) -> bool:
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module == "asyncpg" or module.startswith("asyncpg."):
            return True
        tb = tb.tb_next
    return False


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing more to reset when a connection goes back to the pool.

    asyncpg rolls back a transaction left open before calling this. Its default
    reset would then also run ``RESET ALL``, ``UNLISTEN *``, ``CLOSE ALL`` and
    release advisory locks: one more round trip for every use of the pool, to undo
    session state that notiflow never sets on a pooled connection (listeners have
    connections of their own; advisory locks are transaction-scoped).
    """


def application_name(role: str | None = None) -> dict[str, str]:
    """Session settings that name this service (and ``role``) to PostgreSQL, so that
    ``pg_stat_activity`` and the server's logs tell whose each connection is."""
    name = logs.service() + (f" {role}" if role else "")
    return {"application_name": name[:63]}


# For a service whose statements find their rows by id, by user, or through the
# partial index they are written for, whatever the parameters. Left to choose,
# PostgreSQL plans a prepared statement afresh on every run when the first few runs'
# plans look cheaper than a generic one, which at a few rows a statement they do,
# and planning then costs more than running: the SSE gateway's delivery statement
# (bench/deliver_cost.py) and the senders' claim and sent statements
# (bench/transition_cost.py) cost about half as much with a generic plan.
GENERIC_PLANS = {"plan_cache_mode": "force_generic_plan"}


async def create_pool(settings: Settings, **overrides: object) -> asyncpg.Pool:
    """A pool for ``settings``; ``overrides`` are asyncpg's options, except that
    ``server_settings`` are added to the application name rather than replacing it.
    """
    extra = overrides.pop("server_settings", None)
    server_settings = {
        **application_name(),
        **(extra if isinstance(extra, dict) else {}),
    }
    options: dict[str, object] = {
        "server_settings": server_settings,
        "min_size": settings.db_pool_min,
        "max_size": settings.db_pool_max,
        "command_timeout": settings.db_command_timeout,
        "timeout": settings.db_acquire_timeout * 5,
        "init": _init_connection,
        "reset": _keep_session,
    }
    options.update(overrides)
    pool = await asyncpg.create_pool(settings.database_url, **options)
    if pool is None:  # only when the pool is created without being awaited
        raise RuntimeError("asyncpg.create_pool returned no pool")
    return pool


@asynccontextmanager
async def connection(
    pool: asyncpg.Pool, timeout: float = 2.0
) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection, or :class:`DatabaseUnavailable` within ``timeout``.

    A connection lost while the block uses it is reported as
    :class:`DatabaseUnavailable` too, so callers answer 503 or back off rather
    than treat it as a bug.

    Whatever ended the block is what the caller learns, a cancellation above all:
    giving back a connection whose statement was cut short waits (up to
    ``timeout``) for the server to confirm the cancellation, and a release that
    fails then must not take the place of the ``CancelledError``; a task that
    catches the database's errors would otherwise never learn it was cancelled,
    and run on. Such a connection is closed by the pool instead.
    """
    try:
        conn = await pool.acquire(timeout=timeout)
    except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError) as exc:
        # Taking a connection runs no statement of the caller's: whatever the
        # server says to it (the database refusing connections, dropped, or the
        # role no longer allowed to log in) is the database away, not a bug.
        if isinstance(exc, TimeoutError) and _all_busy(pool):
            # Not the database: this process has more to do than connections.
            raise PoolExhausted(
                f"no database connection: all {pool.get_max_size()} of the pool's "
                f"connections stayed in use for {timeout:g}s "
                "(NOTIFLOW_DB_POOL_MAX)"
            ) from exc
        raise DatabaseUnavailable(f"no database connection: {exc!r}") from exc
    try:
        yield conn
    except BaseException as exc:
        lost = isinstance(exc, LOST_ERRORS) or (
            # Whatever a connection that is closed now raised (asyncpg can report
            # a session the server ended as an internal protocol error), the
            # cause is the lost connection, not the statement.
            isinstance(exc, Exception) and _closed(conn)
        )
        await _release_after(exc, pool, conn)
        await forget_read_only_sessions(pool, exc)
        if lost:
            raise DatabaseUnavailable(f"database connection lost: {exc!r}") from exc
        raise
    await pool.release(conn)


async def forget_read_only_sessions(pool: asyncpg.Pool, exc: BaseException) -> None:
    """Have the pool open new sessions once ``exc`` says a write was refused as
    read-only.

    A session keeps what the database was set to when it began: sessions opened
    while it was read-only (``ALTER DATABASE ... SET default_transaction_read_only``,
    or a server since promoted) would refuse every write after it takes them
    again, and the wait for it would never end.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        # Raised as it is, or as the cause of what the caller made of it.
        if isinstance(current, asyncpg.ReadOnlySQLTransactionError):
            await pool.expire_connections()
            return
        seen.add(id(current))
        current = current.__cause__ or current.__context__


async def _release_after(
    error: BaseException, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """Give ``conn`` back after the block raised ``error``, which stands."""
    try:
        await pool.release(conn)
    except Exception as failed:
        # asyncpg has terminated the connection; its place in the pool is free.
        # (A cancellation of the release itself goes on up, as a cancellation.)
        logger.debug(
            "a connection could not be given back after %r: %r",
            error,
            failed,
            extra={"action": "db.release_failed"},
        )


def _all_busy(pool: asyncpg.Pool) -> bool:
    return pool.get_size() >= pool.get_max_size() and pool.get_idle_size() == 0


def _closed(conn: asyncpg.Connection) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        # The pool has already taken back a connection it saw die.
        return True


@asynccontextmanager
async def transaction(
    pool: asyncpg.Pool, timeout: float = 2.0
) -> AsyncIterator[asyncpg.Connection]:
    """:func:`connection` in a transaction, committed when the block ends well.

    As there, what ended the block is what the caller learns: a rollback that
    fails after a cancellation (the statement being cancelled has the connection
    still) does not take its place.
    """
    async with connection(pool, timeout) as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            yield conn
        except BaseException as exc:
            try:
                await tx.rollback()
            except Exception as failed:
                # Giving the connection back rolls it back, or closes it.
                logger.debug(
                    "could not roll back after %r: %r",
                    exc,
                    failed,
                    extra={"action": "db.rollback_failed"},
                )
            raise
        await tx.commit()


T = TypeVar("T")

# The pauses between attempts of :func:`until_recorded`.
RECORD_FIRST_DELAY = 0.25
RECORD_MAX_DELAY = 2.0


async def until_recorded(
    write: Callable[[], Awaitable[T]], deadline: float, *, what: str, action: str
) -> T:
    """``write()``, tried again while the database is away, for as long as the
    next try would start before ``deadline`` (``time.monotonic()``); after that,
    what it raised.

    For recording what has already happened elsewhere (an email the server took,
    a push a device accepted): a row left ``sending`` until its lease runs out is
    handed out again, and what happened happens a second time.
    """
    delay = RECORD_FIRST_DELAY
    while True:
        try:
            return await write()
        except Exception as exc:
            if not is_unavailable(exc) or time.monotonic() + delay >= deadline:
                raise
            logger.warning(
                "could not %s without a database connection; trying again in %.1fs, "
                "within the row's lease: %r",
                what,
                delay,
                exc,
                extra={"action": action},
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECORD_MAX_DELAY)
