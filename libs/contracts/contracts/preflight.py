"""Start-up checks that turn "connection refused" into instructions.

A service that cannot reach PostgreSQL or RabbitMQ says which one, at which address,
and how to start it, then exits with status 2 instead of printing a traceback.
"""

from __future__ import annotations

import socket
import sys
from urllib.parse import urlsplit

from contracts.settings import Settings, redact_url

PG_HINT = (
    "start it with: pg_ctlcluster --skip-systemctl-redirect "
    "$(ls /etc/postgresql) main start   (or set NOTIFLOW_DATABASE_URL)"
)
AMQP_HINT = "start it with: rabbitmq-server -detached   (or set NOTIFLOW_AMQP_URL)"


def _reachable(url: str, default_port: int, timeout: float = 3.0) -> str | None:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def problems(
    settings: Settings, *, database: bool = True, broker: bool = True
) -> list[str]:
    found = []
    if database and (err := _reachable(settings.database_url, 5432)):
        found.append(
            f"PostgreSQL is not reachable at {redact_url(settings.database_url)} "
            f"({err}); {PG_HINT}"
        )
    if broker and (err := _reachable(settings.amqp_url, 5672)):
        found.append(
            f"RabbitMQ is not reachable at {redact_url(settings.amqp_url)} "
            f"({err}); {AMQP_HINT}"
        )
    return found


def require_services(
    settings: Settings, *, database: bool = True, broker: bool = True
) -> None:
    found = problems(settings, database=database, broker=broker)
    if found:
        for line in found:
            print(f"notiflow: {line}", file=sys.stderr)
        sys.exit(2)
