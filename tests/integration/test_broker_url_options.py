"""A broker URL carrying the query options the clients take: a service and
notiflow-admin connect with it, and RabbitMQ sees what the options asked for."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from contracts.settings import Settings
from tests.support.processes import BIN, Service

pytestmark = pytest.mark.integration

OPTIONS = "heartbeat=30&name=notiflow-options-test&reconnect_interval=2"


def connections(vhost: str) -> list[dict[str, Any]]:
    """The connections RabbitMQ holds to ``vhost``: heartbeat and client name."""
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    columns = ["vhost", "timeout", "client_properties"]
    listed = subprocess.run(
        [ctl, "-q", "list_connections", "--formatter", "json", *columns],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = []
    for row in json.loads(listed.stdout):
        if row["vhost"] == vhost:
            properties = {key: value for key, _, value in row["client_properties"]}
            found.append(
                {
                    "heartbeat": row["timeout"],
                    "name": properties.get("connection_name"),
                }
            )
    return found


def test_a_service_and_admin_connect_with_the_options_in_the_broker_url(
    settings: Settings, tmp_path: Path
) -> None:
    url = f"{settings.amqp_url}?{OPTIONS}"
    vhost = settings.amqp_url.rsplit("/", 1)[1]
    env = {
        "NOTIFLOW_ENV": "test",
        "NOTIFLOW_DATABASE_URL": settings.database_url,
        "NOTIFLOW_AMQP_URL": url,
    }
    # The dispatcher holds both links: aio-pika's, for its relay and
    # publishing, and FastStream's, for its consumers.
    dispatcher = Service("dispatcher", env, tmp_path).start()
    try:
        dispatcher.wait_ready()
        held = connections(vhost)
        admin = subprocess.run(
            [str(BIN / "notiflow-admin"), "dlq", "list"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        dispatcher.stop()

    assert len(held) >= 2, held
    assert all(
        link == {"heartbeat": 30, "name": "notiflow-options-test"} for link in held
    ), held
    assert admin.returncode == 0, admin.stderr
