"""A broker URL whose user name, password or vhost is percent-escaped: the broker
is sent what the escapes spell, and one with a broken escape never reaches it."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from pydantic import ValidationError

from contracts.preflight import problems
from contracts.runtime import Runtime
from contracts.settings import Settings, describe
from tests.support import infra

pytestmark = pytest.mark.integration

# Each character a URL would misread unescaped, a % and a non-ASCII one.
PASSWORD = "p@ss/w%rd ü"
ESCAPED = "p%40ss%2Fw%25rd%20%C3%BC"


@pytest.fixture
def user(amqp_url: str) -> Iterator[str]:
    """A user with the password PASSWORD, who may use the test's vhost."""
    name = infra.create_user(PASSWORD)
    vhost = urlsplit(amqp_url).path.lstrip("/")
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    try:
        subprocess.run(
            [ctl, "-q", "set_permissions", "-p", vhost, name, ".*", ".*", ".*"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield name
    finally:
        infra.delete_user(name)


async def _consumers_log_in(settings: Settings) -> None:
    broker = Runtime(settings, consumers=True).broker
    assert broker is not None
    try:
        await asyncio.wait_for(broker.connect(), timeout=30)
    finally:
        await broker.stop()


def test_a_broker_url_logs_in_with_what_its_escapes_spell_or_is_refused_at_start(
    amqp_url: str, user: str
) -> None:
    vhost = urlsplit(amqp_url).path
    escaped = f"amqp://{user}:{ESCAPED}@127.0.0.1:5672{vhost}"
    # The last escape cut short, as a typo would leave it.
    cut_short = f"amqp://{user}:{ESCAPED[:-1]}@127.0.0.1:5672{vhost}"
    # The broker's default vhost, "/", written as the clients document it.
    default_vhost = "amqp://guest:guest@127.0.0.1:5672/%2F"

    for url in (escaped, default_vhost):
        settings = Settings(amqp_url=url)
        # The start-up check logs in through aio-pika, the consumers through
        # FastStream's broker.
        assert problems(settings, database=False) == [], url
        asyncio.run(_consumers_log_in(settings))

    with pytest.raises(ValidationError) as refused:
        Settings(amqp_url=cut_short)
    assert describe(refused.value).startswith(
        "NOTIFLOW_AMQP_URL: has a % that starts no %XX escape"
    )
