"""Fixtures the gateway's database-backed tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.sse import helpers
from tests.support.data import Demo, seed_demo


@pytest.fixture
async def demo(database_url: str) -> Demo:
    return await seed_demo(database_url)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    async with helpers.database(database_url) as conn:
        yield conn
