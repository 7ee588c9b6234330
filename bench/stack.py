"""The platform under test: started here on private resources, or one already running.

Started here, it gets a database and a RabbitMQ virtual host of its own (the same
helpers the end-to-end tests use), the four services the workload needs as processes
with warnings-only logs, and an SMTP port where the bench's counting sink listens.
Everything is removed again by :meth:`Platform.close`, whatever happened.

Already running (``--comments-url`` and friends), the bench needs its database and
broker URLs too: it writes its users and posts straight into the database, reads the
notification ids of emails back from it, and watches the queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from contracts import migrate
from tests.support import infra
from tests.support.processes import Service, free_port

SERVICES = ("comments", "dispatcher", "email-sender", "sse-gateway")


@dataclass
class Platform:
    comments_url: str
    sse_url: str
    database_url: str
    amqp_url: str
    smtp_port: int
    pids: dict[str, int] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    owned_database: str | None = None
    owned_vhost: str | None = None
    log_dir: Path | None = None

    @classmethod
    def external(
        cls,
        comments_url: str,
        sse_url: str,
        database_url: str,
        amqp_url: str,
        smtp_port: int,
        pids: dict[str, int],
    ) -> Platform:
        return cls(comments_url, sse_url, database_url, amqp_url, smtp_port, pids)

    @classmethod
    def start(cls, smtp_port: int, extra_env: dict[str, str]) -> Platform:
        """Private database, vhost and service processes; ready when this returns."""
        name = infra.unique("notiflow_bench")
        database_url = infra.database_url(name)
        platform = cls("", "", database_url, "", smtp_port, owned_database=name)
        try:
            migrate.apply(database_url)
            platform.owned_vhost = infra.create_vhost()
            platform.amqp_url = infra.amqp_url(platform.owned_vhost)
            platform.log_dir = Path(tempfile.mkdtemp(prefix="notiflow-bench-"))
            env = {
                "NOTIFLOW_ENV": "test",
                "NOTIFLOW_DATABASE_URL": database_url,
                "NOTIFLOW_AMQP_URL": platform.amqp_url,
                "NOTIFLOW_SMTP_PORT": str(smtp_port),
                "NOTIFLOW_LOG_LEVEL": "WARNING",
                # The load comes from a handful of users, far past what one
                # person may post a minute.
                "NOTIFLOW_COMMENTS_PER_MINUTE": "0",
                **extra_env,
            }
            for service in SERVICES:
                platform.services[service] = Service(
                    service, env, platform.log_dir
                ).start()
            for service in platform.services.values():
                service.wait_ready(timeout=60)
        except BaseException:
            platform.close()
            raise
        platform.comments_url = platform.services["comments"].url
        platform.sse_url = platform.services["sse-gateway"].url
        platform.pids = {
            name: s.proc.pid for name, s in platform.services.items() if s.proc
        }
        return platform

    @property
    def metrics_urls(self) -> list[str]:
        """The ``/metrics`` addresses of the services this platform started."""
        return [f"{s.url}/metrics" for s in self.services.values()]

    def logs(self) -> dict[str, str]:
        """The tail of each service's log, for a run that went wrong."""
        return {name: s.log() for name, s in self.services.items()}

    def close(self) -> None:
        for service in self.services.values():
            with contextlib.suppress(Exception):
                service.stop(timeout=15)
        if self.owned_vhost:
            with contextlib.suppress(Exception):
                infra.delete_vhost(self.owned_vhost)
        if self.owned_database:
            with contextlib.suppress(Exception):
                asyncio.run(infra.drop_database(self.owned_database))
        if self.log_dir and self.log_dir.exists():
            for path in self.log_dir.iterdir():
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.log_dir.rmdir()


def smtp_port_for_own_platform() -> int:
    return int(os.environ.get("BENCH_SMTP_PORT", 0)) or free_port()
