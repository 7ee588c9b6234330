"""The demo page in headless Chromium against the real services.

Chromium is Debian's (``/usr/bin/chromium``), driven by Playwright; Playwright's
own browser downloads are never used. The services run in development mode, the
way ``make run`` runs them, because the page signs in with the development-only
token route of the comments service.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

from contracts.settings import Settings
from tests.support.data import Demo, seed_demo
from tests.support.processes import Service

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@dataclass(frozen=True)
class Platform:
    comments: Service
    dispatcher: Service
    gateway: Service
    demo: Demo


@pytest.fixture
async def platform(settings: Settings, tmp_path: Path) -> AsyncIterator[Platform]:
    """comments, dispatcher and the gateway, which serves the page."""
    demo = await seed_demo(settings.database_url)
    common = {
        "NOTIFLOW_ENV": "development",
        "NOTIFLOW_DATABASE_URL": settings.database_url,
        "NOTIFLOW_AMQP_URL": settings.amqp_url,
        "NOTIFLOW_OUTBOX_SWEEP_SECONDS": "0.5",
        "NOTIFLOW_DRAIN_SECONDS": "3",
    }
    comments = Service("comments", common, tmp_path)
    gateway = Service("sse-gateway", common, tmp_path)
    # Each needs the other's address, known only once both have their ports.
    comments._env["NOTIFLOW_CORS_ORIGINS"] = gateway.url
    gateway._env["NOTIFLOW_API_BASE_URL"] = comments.url
    dispatcher = Service("dispatcher", common, tmp_path)
    services = [comments, dispatcher, gateway]
    try:
        for service in services:
            service.start()
        for service in services:
            service.wait_ready()
        yield Platform(comments, dispatcher, gateway, demo)
    finally:
        for service in services:
            service.stop()


@pytest.fixture
def site(platform: Platform) -> tuple[Service, Demo]:
    """The gateway serving the page, and the demo data."""
    return platform.gateway, platform.demo
