"""Two people on the demo page: a mention reaches the other's bell and list live,
read state follows the user across tabs, and a reload loses nothing."""

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


async def open_as(browser: Browser, gateway: Service, username: str) -> Page:
    context = await browser.new_context(viewport={"width": 1100, "height": 800})
    page = await context.new_page()
    await page.goto(f"{gateway.url}/?user={username}")
    await expect(page.locator("#status")).to_have_text("live")
    await expect(page.locator("#post-title")).to_have_text("Welcome to notiflow")
    return page


async def comment(page: Page, text: str) -> None:
    await page.fill("#comment-body", text)
    await page.click("#comment-submit")
    await expect(page.locator("#comments")).to_contain_text(text)
    await expect(page.locator("#comment-body")).to_have_value("")


async def test_a_mention_lights_up_the_other_users_bell_live(
    browser: Browser, site: Site, tmp_path: Path
) -> None:
    gateway, _ = site
    bob = await open_as(browser, gateway, "bob")
    carol = await open_as(browser, gateway, "carol")
    await expect(bob.locator("#unread-count")).to_have_attribute("data-count", "0")

    await comment(carol, "Lovely post. @bob, what do you think?")

    await expect(bob.locator("#unread-count")).to_have_text("1")
    first = bob.locator("#live-notes .note").first
    await expect(first).to_contain_text("mentioned you")
    await expect(first).to_have_class("note unread")
    # The post on bob's page picks up carol's comment without a reload.
    await expect(bob.locator("#comments")).to_contain_text("what do you think?")
    await expect(carol.locator("#unread-count")).to_have_attribute("data-count", "0")

    await bob.click("#bell")
    await expect(bob.locator("#notifications .note")).to_have_count(1)
    await bob.screenshot(path=str(tmp_path / "bob.png"))


async def test_marking_read_in_one_tab_clears_it_in_another(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    first_tab = await open_as(browser, gateway, "bob")
    second_tab = await first_tab.context.new_page()
    await second_tab.goto(f"{gateway.url}/?user=bob")
    await expect(second_tab.locator("#status")).to_have_text("live")
    carol = await open_as(browser, gateway, "carol")

    await comment(carol, "@bob one")
    await comment(carol, "@bob two")
    for tab in (first_tab, second_tab):
        await expect(tab.locator("#unread-count")).to_have_text("2")

    await first_tab.locator("#live-notes .note.unread").first.click()
    await expect(second_tab.locator("#unread-count")).to_have_text("1")
    await expect(second_tab.locator("#live-notes .note.unread")).to_have_count(1)

    await second_tab.click("#bell")
    await second_tab.click("#mark-all")
    await expect(first_tab.locator("#unread-count")).to_have_attribute(
        "data-count", "0"
    )
    await expect(first_tab.locator("#live-notes .note.unread")).to_have_count(0)


async def test_reloading_loses_nothing(browser: Browser, site: Site) -> None:
    gateway, _ = site
    bob = await open_as(browser, gateway, "bob")
    carol = await open_as(browser, gateway, "carol")
    await comment(carol, "@bob before the reload")
    await expect(bob.locator("#unread-count")).to_have_text("1")

    await bob.close()
    # While bob has no page open, another mention arrives.
    await comment(carol, "@bob while you were away")

    page = await bob.context.new_page()
    await page.goto(f"{gateway.url}/?user=bob")
    await expect(page.locator("#status")).to_have_text("live")
    await expect(page.locator("#unread-count")).to_have_text("2")
    notes = page.locator("#notifications .note")
    await expect(notes).to_have_count(2)
    await expect(notes.first).to_contain_text("while you were away")
    await page.reload()
    await expect(page.locator("#status")).to_have_text("live")
    await expect(notes).to_have_count(2)
    await expect(page.locator("#unread-count")).to_have_text("2")


async def test_a_notification_link_opens_its_post_among_more_than_the_list_holds(
    browser: Browser, site: Site, settings: Settings
) -> None:
    gateway, demo = site
    # The posts list holds the newest hundred: the linked post is not in it.
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(
            "INSERT INTO posts (author_id, title, body) "
            "SELECT $1, 'Newer post ' || n, 'x' FROM generate_series(1, 120) n",
            demo.bob,
        )
    finally:
        await conn.close()
    context = await browser.new_context()
    page = await context.new_page()

    await page.goto(f"{gateway.url}/?user=bob&post={demo.post}#comment-1")

    await expect(page.locator("#post-title")).to_have_text("Welcome to notiflow")
    await page.fill("#comment-body", "Replying where the link pointed")
    await page.click("#comment-submit")
    await expect(page.locator("#comments")).to_contain_text("where the link pointed")


async def test_the_page_and_its_icon_load_without_an_error(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    page = await (await browser.new_context()).new_page()
    errors: list[str] = []
    page.on(
        "response",
        lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None,
    )

    await page.goto(f"{gateway.url}/?user=bob")
    await expect(page.locator("#status")).to_have_text("live")
    icons = await page.evaluate(
        """() => Promise.all(
            [document.querySelector("link[rel=icon]").href, "/favicon.ico"].map(
                (url) => fetch(url).then(
                    (r) => `${r.status} ${r.headers.get("content-type")}`
                )
            )
        )"""
    )

    assert icons == ["200 image/svg+xml", "200 image/svg+xml"]
    assert errors == []
