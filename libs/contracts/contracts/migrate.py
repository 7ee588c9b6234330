"""``notiflow-migrate``: create the database if needed and apply the migrations.

Migrations are the SQL files beside this module, applied in name order by yoyo,
which records what it applied in the database itself.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from yoyo import get_backend, read_migrations

from contracts.settings import Settings, get_settings, load_or_exit, redact_url

MIGRATIONS = Path(__file__).with_name("migrations")
logger = logging.getLogger(__name__)


def _yoyo_url(database_url: str) -> str:
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(scheme="postgresql+psycopg"))


def ensure_database(database_url: str) -> bool:
    """Create the database named in ``database_url`` if missing; True if created."""
    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if exists:
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Apply the notiflow migrations.")
    parser.add_argument("--rollback-all", action="store_true")
    args = parser.parse_args(argv)

    from contracts.preflight import require_services

    settings: Settings = load_or_exit(get_settings)
    require_services(settings, broker=False)
    if args.rollback_all:
        count = rollback_all(settings.database_url)
        print(
            f"rolled back {count} migration(s) on {redact_url(settings.database_url)}"
        )
        return
    count = apply(settings.database_url)
    print(f"applied {count} migration(s) to {redact_url(settings.database_url)}")
