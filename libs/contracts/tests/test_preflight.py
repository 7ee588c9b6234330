"""Start-up checks name what is missing, where, and what to do about it."""

from __future__ import annotations

import pytest

from contracts.preflight import problems
from contracts.settings import Settings
from tests.support import infra

pytestmark = pytest.mark.integration


def test_a_closed_port_is_named_with_how_to_start_the_server() -> None:
    settings = Settings(
        database_url="postgresql://postgres:pw@127.0.0.1:1/x",
        amqp_url="amqp://guest:secret@127.0.0.1:1/",
    )

    pg, mq = problems(settings)

    assert (
        "PostgreSQL is not reachable at postgresql://postgres:***@127.0.0.1:1/x" in pg
    )
    assert "pg_ctlcluster" in pg
    assert "RabbitMQ is not reachable at amqp://guest:***@127.0.0.1:1/" in mq
    assert "rabbitmq-server -detached" in mq
    assert "pw" not in pg and "secret" not in mq


def test_a_missing_vhost_and_wrong_password_are_told_apart(amqp_url: str) -> None:
    missing = amqp_url + "_gone"
    wrong = amqp_url.replace("guest:guest@", "guest:wrong@")

    [no_vhost] = problems(Settings(amqp_url=missing), database=False)
    [refused] = problems(Settings(amqp_url=wrong), database=False)

    assert "virtual host" in no_vhost and "rabbitmqctl add_vhost" in no_vhost
    assert "refused the user name or password" in refused
    assert problems(Settings(amqp_url=amqp_url), database=False) == []


def test_a_service_needs_a_migrated_database() -> None:
    name = infra.unique("notiflow_pre")
    absent = Settings(database_url=infra.database_url(name))

    [missing] = problems(absent, broker=False, migrated=True)

    assert "does not exist" in missing and "make migrate" in missing
    assert problems(absent, broker=False) == [], "migrate itself only needs a login"


def test_a_url_option_the_driver_refuses_is_named_without_the_password() -> None:
    with_password = infra.PG_URL.replace("://postgres@", "://postgres:hunter22@")
    settings = Settings(database_url=f"{with_password}/x?sslmode=bogus")

    [refused] = problems(settings, broker=False)

    assert refused.startswith("invalid setting NOTIFLOW_DATABASE_URL: `sslmode`")
    assert "hunter22" not in refused
