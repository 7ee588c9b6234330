"""Fixtures for the integration tier: real PostgreSQL, RabbitMQ and SMTP, services
run in the test's own event loop through their FastAPI lifespans."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from contracts.auth import issue_token
from contracts.settings import Settings
from email_sender.app import EmailSettings, create_app
from tests.integration.proxy import Proxy
from tests.support.data import Demo, seed_demo
from tests.support.infra import with_database
from tests.support.smtp import SmtpServer


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


@pytest.fixture
async def demo(settings: Settings) -> Demo:
    return await seed_demo(settings.database_url)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[FastAPI]:
    """The app with its lifespan entered: consumers and relays are running."""
    async with app.router.lifespan_context(app):
        yield app


@asynccontextmanager
async def calling(
    app: FastAPI, settings: Settings, user_id: int, name: str
) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` running, and a client that calls it as user ``user_id``."""
    token = issue_token(user_id, name, settings)
    async with (
        running(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://app",
            headers={"Authorization": f"Bearer {token}"},
        ) as client,
    ):
        yield client


@pytest.fixture
async def proxy(settings: Settings) -> AsyncIterator[Proxy]:
    """A proxy to the test's PostgreSQL, which the test may cut; see :func:`through`."""
    target = urlsplit(settings.database_url)
    proxy = Proxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def through(settings: Settings, proxy: Proxy) -> str:
    """The test's database URL, by way of ``proxy``."""
    url = urlsplit(settings.database_url)
    return with_database(
        f"postgresql://{url.username}@127.0.0.1:{proxy.port}", url.path.lstrip("/")
    )


EmailSenderFactory = Callable[..., AbstractAsyncContextManager[FastAPI]]


@pytest.fixture
def email_sender(settings: Settings, smtp: SmtpServer) -> EmailSenderFactory:
    """``async with email_sender(**overrides) as app`` runs an email sender."""

    def start(**overrides: Any) -> AbstractAsyncContextManager[FastAPI]:
        options: dict[str, Any] = {
            **settings.model_dump(),
            "smtp_port": smtp.port,
            "smtp_timeout": 0.5,
            "email_lease_seconds": 3,
            "email_sweep_seconds": 0.3,
            **overrides,
        }
        # The reply to an email's content is waited for as long as any other,
        # unless a test says otherwise.
        options.setdefault("smtp_data_timeout", options["smtp_timeout"])
        return running(create_app(EmailSettings(**options)))

    return start
