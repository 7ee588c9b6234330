"""``notiflow-migrate``: create the database if needed and apply the migrations.

Migrations are the SQL files beside this module, applied in name order by yoyo,
which records what it applied in the database itself.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from urllib.parse import unquote, urlencode

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict
from yoyo import get_backend, read_migrations
from yoyo.exceptions import LockTimeout

from contracts.cli import Once
from contracts.settings import Settings, get_settings, load_or_exit, redact_url

MIGRATIONS = Path(__file__).with_name("migrations")
logger = logging.getLogger(__name__)

# The unique index a CREATE DATABASE that loses a race with another one trips,
# past the check that would have said "already exists".
DATABASE_NAME_INDEX = "pg_database_datname_index"


class MigrateError(Exception):
    """Why the migrations could not run, in one line that repeats no password."""


def _yoyo_url(database_url: str) -> str:
    """``database_url`` as yoyo takes it, every part as libpq reads it.

    yoyo reads the URL itself and would keep the database name's %XX escapes
    as written, where libpq and asyncpg decode them: each part goes in the
    query as a libpq keyword, which yoyo hands psycopg as it is.
    """
    return "postgresql+psycopg://?" + urlencode(conninfo_to_dict(database_url))


def database_name(database_url: str) -> str:
    """The database ``database_url`` names, as libpq and asyncpg read it."""
    return conninfo_to_dict(database_url).get("dbname") or ""


def ensure_database(database_url: str) -> bool:
    """Create the database named in ``database_url`` if missing; True if created.

    Runs started together (the init containers of several replicas) may all
    find it missing: the one whose CREATE DATABASE loses sees it exist.
    """
    name = database_name(database_url)
    with psycopg.connect(
        database_url, dbname="postgres", autocommit=True, connect_timeout=10
    ) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if exists:
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except errors.DuplicateDatabase:
            return False
        except errors.UniqueViolation as exc:
            if exc.diag.constraint_name != DATABASE_NAME_INDEX:
                raise
            return False
        except errors.InsufficientPrivilege:
            raise MigrateError(
                f"the database {name!r} does not exist and this user may not create "
                "it: create it (createdb, or CREATE DATABASE as a user who may), or "
                "grant this user CREATEDB"
            ) from None
        return True


def apply(database_url: str) -> int:
    """Apply pending migrations; return how many were applied."""
    ensure_database(database_url)
    backend = get_backend(_yoyo_url(database_url))
    try:
        migrations = read_migrations(str(MIGRATIONS))
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
        return len(pending)
    finally:
        backend.connection.close()


def rollback_all(database_url: str) -> int:
    backend = get_backend(_yoyo_url(database_url))
    try:
        migrations = read_migrations(str(MIGRATIONS))
        with backend.lock():
            applied = backend.to_rollback(migrations)
            backend.rollback_migrations(applied)
        return len(applied)
    finally:
        backend.connection.close()


def _scrubbed(text: str, database_url: str) -> str:
    """``text`` with the password of ``database_url`` blanked, should libpq or a
    server message repeat it."""
    password = conninfo_to_dict(database_url).get("password")
    for secret in {password, unquote(password)} if password else ():
        text = text.replace(secret, "***")
    return text


def run(database_url: str, *, rollback: bool = False) -> str:
    """Apply (or roll back) the migrations; what was done, in one line.

    MigrateError saying, in one line, why they could not be.
    """
    where = redact_url(database_url)
    try:
        if rollback:
            return f"rolled back {rollback_all(database_url)} migration(s) on {where}"
        return f"applied {apply(database_url)} migration(s) to {where}"
    except LockTimeout:
        raise MigrateError(
            f"another run holds the migration lock on {where}; wait for it to end "
            "and run again (if none is running, one that was killed left its lock "
            "behind: remove it with DELETE FROM yoyo_lock)"
        ) from None
    except psycopg.Error as exc:
        problem = " ".join(str(exc).split()) or type(exc).__name__
        raise MigrateError(
            f"migrating {where} failed: {_scrubbed(problem, database_url)}"
        ) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        # Options are written out in full: --roll must not drop every table.
        allow_abbrev=False,
        description=(
            "Create the database named by NOTIFLOW_DATABASE_URL if it does not "
            "exist, and apply the notiflow migrations it lacks."
        ),
    )
    parser.add_argument(
        "--rollback-all",
        action="store_true",
        help=(
            "undo every migration instead: this drops every notiflow table, and "
            "all its rows, from the database (asks for --confirm)"
        ),
    )
    parser.add_argument(
        "--confirm",
        action=Once,
        metavar="DATABASE",
        help="with --rollback-all, the name of the database, to say it is meant",
    )
    args = parser.parse_args(argv)

    from contracts.preflight import require_services

    settings: Settings = load_or_exit(get_settings)
    if args.rollback_all:
        name = database_name(settings.database_url)
        if args.confirm != name:
            parser.exit(
                2,
                f"notiflow: --rollback-all drops every notiflow table and all its "
                f"rows from {redact_url(settings.database_url)}; to do that, run "
                f"it again with --confirm {shlex.quote(name)}\n",
            )
    elif args.confirm is not None:
        parser.error("--confirm goes with --rollback-all only")
    require_services(settings, broker=False)
    try:
        print(run(settings.database_url, rollback=args.rollback_all))
    except MigrateError as exc:
        print(f"notiflow: {exc}", file=sys.stderr)
        sys.exit(1)
