"""The "Notify me by" boxes on the demo page, against the real preferences API.

What the boxes show and store is checked in ``notification_preferences`` itself.
A refused change is a real refusal by the gateway: the browser's request is let
through with a forged token in place of the page's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import httpx
import pytest
from playwright.async_api import Browser, Locator, Page, Route, expect

from contracts.auth import unsubscribe_url
from contracts.settings import Settings
from tests.support.data import Demo
from tests.support.processes import Service
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

Site = tuple[Service, Demo]

STORE = """
INSERT INTO notification_preferences (user_id, type, enabled) VALUES ($1, $2, $3)
"""
STORED = """
SELECT type, enabled FROM notification_preferences WHERE user_id = $1
"""


async def stored(settings: Settings, user_id: int) -> dict[str, bool]:
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        return dict(await conn.fetch(STORED, user_id))
    finally:
        await conn.close()


async def stored_is(settings: Settings, user_id: int, wanted: dict[str, bool]) -> bool:
    return await stored(settings, user_id) == wanted


async def store(settings: Settings, user_id: int, type_: str, enabled: bool) -> None:
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        await conn.execute(STORE, user_id, type_, enabled)
    finally:
        await conn.close()


async def open_as(browser: Browser, gateway: Service, username: str) -> Page:
    context = await browser.new_context(viewport={"width": 1100, "height": 800})
    page = await context.new_page()
    await page.goto(f"{gateway.url}/?user={username}")
    await expect(page.locator("#status")).to_have_text("live")
    return page


def box(page: Page, name: str) -> Locator:
    group = page.get_by_role("group", name="Notify me by")
    return group.get_by_role("checkbox", name=name)


async def expect_boxes(page: Page, email: bool, live: bool, push: bool) -> None:
    for name, checked in (
        ("Email", email),
        ("Live in this page", live),
        ("Browser push", push),
    ):
        await expect(box(page, name)).to_be_enabled()
        await expect(box(page, name)).to_be_checked(checked=checked)


async def test_the_boxes_show_what_each_user_has_stored(
    browser: Browser, site: Site, settings: Settings, tmp_path: Path
) -> None:
    gateway, demo = site
    await store(settings, demo.bob, "push", False)

    page = await open_as(browser, gateway, "bob")

    await expect_boxes(page, email=True, live=True, push=False)
    await page.screenshot(path=str(tmp_path / "bob.png"))
    await page.select_option("#user-select", "carol")
    await expect(page.locator("#status")).to_have_text("live")
    await expect_boxes(page, email=True, live=True, push=True)
    await expect(page.locator("#prefs-error")).to_be_empty()


async def test_unchecking_email_is_stored_and_survives_a_reload(
    browser: Browser, site: Site, settings: Settings
) -> None:
    gateway, demo = site
    page = await open_as(browser, gateway, "bob")
    await expect_boxes(page, email=True, live=True, push=True)

    await box(page, "Email").uncheck()

    await eventually(
        lambda: stored_is(settings, demo.bob, {"email": False}),
        what="email=false stored",
    )
    await expect_boxes(page, email=False, live=True, push=True)
    await page.reload()
    await expect(page.locator("#status")).to_have_text("live")
    await expect_boxes(page, email=False, live=True, push=True)
    assert await stored(settings, demo.bob) == {"email": False}


async def test_the_boxes_follow_a_change_made_in_another_tab_or_by_an_email_link(
    browser: Browser, site: Site, settings: Settings
) -> None:
    gateway, demo = site
    first = await open_as(browser, gateway, "bob")
    second = await first.context.new_page()
    await second.goto(f"{gateway.url}/?user=bob")
    await expect(second.locator("#status")).to_have_text("live")
    await expect_boxes(second, email=True, live=True, push=True)

    await box(first, "Browser push").uncheck()
    await expect_boxes(second, email=True, live=True, push=False)

    # The unsubscribe link in an email, followed in a mail program.
    link = unsubscribe_url(gateway.url, demo.bob, settings.secret_key)
    async with httpx.AsyncClient() as client:
        turned_off = await client.post(link)
    assert turned_off.status_code == 200
    for page in (first, second):
        await expect_boxes(page, email=False, live=True, push=False)
    assert await stored(settings, demo.bob) == {"push": False, "email": False}


async def test_a_refused_change_puts_the_box_back_and_says_why(
    browser: Browser, site: Site, settings: Settings
) -> None:
    gateway, demo = site
    page = await open_as(browser, gateway, "bob")
    await expect_boxes(page, email=True, live=True, push=True)
    release = asyncio.Event()

    async def forge(route: Route) -> None:
        if route.request.method != "PATCH":
            await route.continue_()
            return
        await release.wait()
        headers = {**route.request.headers, "authorization": "Bearer forged"}
        await route.continue_(headers=headers)

    await page.route("**/preferences", forge)
    email = box(page, "Email")

    await email.uncheck()

    # Held in flight: the box shows the asked-for state and takes no other click.
    await expect(email).to_be_disabled()
    await expect(email).not_to_be_checked()
    await expect(box(page, "Browser push")).to_be_enabled()
    release.set()
    await expect(page.locator("#prefs-error")).to_have_text(
        "Could not save “Email”: token is invalid"
    )
    await expect_boxes(page, email=True, live=True, push=True)
    assert await stored(settings, demo.bob) == {}

    # The next change that goes through clears the message.
    await page.unroute("**/preferences")
    await box(page, "Browser push").uncheck()
    await expect(page.locator("#prefs-error")).to_be_empty()
    await expect_boxes(page, email=True, live=True, push=False)
    assert await stored(settings, demo.bob) == {"push": False}


async def test_a_page_whose_stream_comes_back_shows_the_settings_as_stored_now(
    browser: Browser, site: Site, settings: Settings
) -> None:
    gateway, demo = site
    page = await open_as(browser, gateway, "bob")
    await expect_boxes(page, email=True, live=True, push=True)

    # The stream is cut: a change saved meanwhile fails and says so, and one made
    # elsewhere (another replica, an email's link) is never announced to it.
    gateway.kill()
    await expect(page.locator("#status")).not_to_have_text("live")
    # A click, not uncheck(): the failed save may put the box back before
    # Playwright looks at it.
    await box(page, "Browser push").click()
    await expect(page.locator("#prefs-error")).to_contain_text(
        "Could not save “Browser push”"
    )
    await store(settings, demo.bob, "email", False)
    gateway.start().wait_ready()

    await expect(page.locator("#status")).to_have_text("live", timeout=15_000)
    await expect_boxes(page, email=False, live=True, push=True)
    await expect(page.locator("#prefs-error")).to_be_empty()
