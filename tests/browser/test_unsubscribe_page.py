"""The page an email's unsubscribe link opens, in Chromium, against the gateway.

Opening the link changes nothing; pressing its button turns the user's emails off,
as ``notification_preferences`` then shows.
"""

from __future__ import annotations

import asyncpg
import pytest
from playwright.async_api import Browser, expect

from contracts.auth import unsubscribe_url
from contracts.settings import Settings
from tests.support.data import Demo
from tests.support.processes import Service
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

STORED = "SELECT type, enabled FROM notification_preferences WHERE user_id = $1"


async def stored(settings: Settings, user_id: int) -> dict[str, bool]:
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        return dict(await conn.fetch(STORED, user_id))
    finally:
        await conn.close()


async def test_pressing_the_button_of_the_link_page_turns_email_off(
    browser: Browser, site: tuple[Service, Demo], settings: Settings
) -> None:
    gateway, demo = site
    link = unsubscribe_url(gateway.url, demo.bob, settings.secret_key)
    page = await (await browser.new_context()).new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    icons: list[int] = []
    page.on(
        "response", lambda r: icons.append(r.status) if r.url.endswith(".svg") else None
    )

    await page.goto(link)

    await expect(page.get_by_role("heading")).to_have_text(
        "Turn off notification emails?"
    )
    await expect(page.get_by_text("Bob Dupont (b…@example.com)")).to_be_visible()
    assert await stored(settings, demo.bob) == {}, "opening the link changes nothing"

    await page.get_by_role("button", name="Turn off notification emails").click()

    await expect(page.get_by_role("heading")).to_have_text(
        "Notification emails turned off"
    )
    await eventually(
        lambda: _email_off(settings, demo.bob), what="bob's email preference off"
    )
    assert await stored(settings, demo.bob) == {"email": False}

    # The page's own policy lets its icon load, on both of its pages; the
    # second page's may come in after its heading shows.
    async def both_icons() -> bool:
        return len(icons) == 2

    await eventually(both_icons, what="the second page's icon", timeout=10)
    assert icons == [200, 200]
    assert errors == []


async def _email_off(settings: Settings, user_id: int) -> bool:
    return (await stored(settings, user_id)).get("email") is False
