"""Whom the demo page signs in as when the user it is asked for is not there: a
name that does not exist falls back, with a word, to the user the page picks on
its own; a database with no users at all gets told how to add the demo ones."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from playwright.async_api import Browser, Page, expect

from contracts.settings import Settings
from tests.support.data import Demo
from tests.support.processes import Service

pytestmark = pytest.mark.e2e

Site = tuple[Service, Demo]


async def watched_page(browser: Browser) -> tuple[Page, list[str]]:
    """A page in a fresh context, and the errors it logs, throws or is answered."""
    page = await (await browser.new_context()).new_page()
    errors: list[str] = []
    page.on(
        "console",
        lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None,
    )
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on(
        "response",
        lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None,
    )
    return page, errors


async def test_an_unknown_user_falls_back_to_the_default_one_with_a_notice(
    browser: Browser, site: Site, tmp_path: Path
) -> None:
    gateway, _ = site
    plain, _ = await watched_page(browser)
    await plain.goto(f"{gateway.url}/")
    await expect(plain.locator("#status")).to_have_text("live")
    default = await plain.locator("#user-select").input_value()
    assert default
    await expect(plain.locator("#notice")).to_be_hidden()

    page, errors = await watched_page(browser)
    await page.goto(f"{gateway.url}/?user=mallory")

    await expect(page.locator("#status")).to_have_text("live")
    await expect(page.locator("#user-select")).to_have_value(default)
    await expect(page.locator("#notice")).to_have_text(
        f"There is no user “mallory”; showing {default}."
    )
    await expect(page.locator("#post-title")).to_have_text("Welcome to notiflow")
    await page.screenshot(path=str(tmp_path / "unknown-user.png"))
    assert errors == []

    # Choosing someone else leaves the notice about the name behind.
    await page.select_option("#user-select", "carol")
    await expect(page.locator("#status")).to_have_text("live")
    await expect(page.locator("#notice")).to_be_hidden()
    assert errors == []


async def test_a_remembered_user_who_is_gone_falls_back_quietly(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    page, errors = await watched_page(browser)
    # As after the database was reset: the browser remembers a user no longer there.
    await page.add_init_script('localStorage.setItem("notiflow.user", "mallory")')

    await page.goto(f"{gateway.url}/")

    await expect(page.locator("#status")).to_have_text("live")
    await expect(page.locator("#user-select")).to_have_value("bob")
    await expect(page.locator("#notice")).to_be_hidden()
    assert errors == []


async def test_a_database_without_users_says_how_to_add_the_demo_ones(
    browser: Browser, site: Site, settings: Settings, tmp_path: Path
) -> None:
    gateway, _ = site
    conn = await asyncpg.connect(settings.database_url)
    try:
        # The users and everything that points at them: posts, comments, inboxes.
        await conn.execute("TRUNCATE users CASCADE")
    finally:
        await conn.close()
    page, errors = await watched_page(browser)
    asked_for_token: list[str] = []
    page.on(
        "request",
        lambda r: asked_for_token.append(r.url) if "/dev/token" in r.url else None,
    )

    await page.goto(f"{gateway.url}/?user=bob")

    notice = page.locator("#notice")
    await expect(notice).to_contain_text("There are no users yet")
    await expect(notice).to_contain_text("make seed")
    await expect(notice).to_contain_text("uv run notiflow-seed")
    await expect(page.locator("#status")).to_have_text("no users")
    await expect(page.locator("#post-title")).to_have_text("No posts yet")
    await page.wait_for_load_state("networkidle")
    await page.screenshot(path=str(tmp_path / "no-users.png"))
    assert asked_for_token == []
    assert errors == []
