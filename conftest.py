"""Fixtures shared by every test tier; see tests/support for what they build on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from contracts.settings import Settings
from tests.support import infra


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    name = infra.create_template()
    yield name
    asyncio.run(infra.drop_database(name))


@pytest.fixture
async def database_url(pg_template: str) -> AsyncIterator[str]:
    """A freshly migrated database of this test's own."""
    name = await infra.create_database(pg_template)
    try:
        yield infra.database_url(name)
    finally:
        await infra.drop_database(name)


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """A RabbitMQ virtual host of this test's own."""
    vhost = infra.create_vhost()
    try:
        yield infra.amqp_url(vhost)
    finally:
        infra.delete_vhost(vhost)


@pytest.fixture
def settings(database_url: str, amqp_url: str) -> Settings:
    return Settings(
        env="test",
        database_url=database_url,
        amqp_url=amqp_url,
        retry_delays="1,2",
        outbox_sweep_seconds=0.5,
        drain_seconds=3,
    )
