"""Fixtures for the live-stream tests: gateway processes and demo tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from contracts.auth import issue_token
from contracts.settings import Settings
from tests.support.data import Demo, seed_demo
from tests.support.processes import Service

StartGateway = Callable[..., Service]


@pytest.fixture
def start_gateway(settings: Settings, tmp_path: Path) -> Iterator[StartGateway]:
    """Start an sse-gateway process on the test's database and vhost."""
    started: list[Service] = []

    def start(**env: str) -> Service:
        service = Service(
            "sse-gateway",
            {
                "NOTIFLOW_ENV": "test",
                "NOTIFLOW_DATABASE_URL": settings.database_url,
                "NOTIFLOW_AMQP_URL": settings.amqp_url,
                "NOTIFLOW_DRAIN_SECONDS": "3",
                **env,
            },
            tmp_path,
        )
        started.append(service.start())
        service.wait_ready()
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def gateway(start_gateway: StartGateway) -> Service:
    return start_gateway()


@pytest.fixture
async def demo(settings: Settings) -> Demo:
    return await seed_demo(settings.database_url)


@pytest.fixture
def token(settings: Settings, demo: Demo) -> Callable[..., str]:
    names = {demo.alice: "alice", demo.bob: "bob", demo.carol: "carol"}

    def make(user_id: int, ttl: int | None = None) -> str:
        return issue_token(user_id, names.get(user_id, "user"), settings, ttl)

    return make
