"""The platform as processes for end-to-end tests: every service against the test's
private database and virtual host, delivering mail to a real SMTP server (aiosmtpd
writing a Maildir, as ``make run`` starts it)."""

from __future__ import annotations

import mailbox
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from contracts.settings import Settings
from tests.support.processes import Service, free_port

SERVICES = ("comments", "dispatcher", "email-sender", "sse-gateway")


@pytest.fixture
def maildir(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """An SMTP server keeping what it takes in a Maildir; its path and port."""
    path = tmp_path / "mail"
    mailbox.Maildir(path, create=True)
    port = free_port()
    listen = ["-n", "-l", f"127.0.0.1:{port}"]
    handler = ["-c", "aiosmtpd.handlers.Mailbox", str(path)]
    server = subprocess.Popen([sys.executable, "-m", "aiosmtpd", *listen, *handler])
    try:
        yield path, port
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
async def platform(
    settings: Settings, maildir: tuple[Path, int], tmp_path: Path
) -> AsyncIterator[dict[str, Service]]:
    env = {
        "NOTIFLOW_ENV": "test",
        "NOTIFLOW_DATABASE_URL": settings.database_url,
        "NOTIFLOW_AMQP_URL": settings.amqp_url,
        "NOTIFLOW_SMTP_PORT": str(maildir[1]),
        "NOTIFLOW_OUTBOX_SWEEP_SECONDS": "0.5",
    }
    services = {name: Service(name, env, tmp_path) for name in SERVICES}
    # The links in emails lead to the gateway, whose port is known only now.
    for service in services.values():
        service._env["NOTIFLOW_PUBLIC_URL"] = services["sse-gateway"].url
    try:
        for service in services.values():
            service.start()
        for service in services.values():
            service.wait_ready()
        yield services
    finally:
        for service in services.values():
            service.stop()
