"""The demo page where its requests cross live changes, its token stops being
accepted, people write long words, a link names a comment, or the inbox cannot be
reached for a moment."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from playwright.async_api import Browser, Route, expect

from contracts.auth import issue_token
from contracts.settings import Settings
from tests.browser.test_live_page import Site, comment, open_as

pytestmark = pytest.mark.e2e


async def test_mark_all_read_leaves_a_notification_that_arrived_meanwhile_unread(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    bob = await open_as(browser, gateway, "bob")
    carol = await open_as(browser, gateway, "carol")
    await comment(carol, "@bob before")
    await expect(bob.locator("#unread-count")).to_have_text("1")

    # The answer to "mark all read" comes back only after a newer mention has
    # reached the page live.
    fetched = asyncio.Event()
    release = asyncio.Event()

    async def hold(route: Route) -> None:
        response = await route.fetch()
        fetched.set()
        await release.wait()
        await route.fulfill(response=response)

    await bob.route("**/inbox/read-all", hold)
    await bob.click("#bell")
    await bob.click("#mark-all")
    await asyncio.wait_for(fetched.wait(), 10)
    await comment(carol, "@bob meanwhile")
    await expect(bob.locator("#notifications .note")).to_have_count(2)
    release.set()

    newer = bob.locator("#notifications .note").first
    await expect(newer).to_contain_text("meanwhile")
    await expect(newer).to_have_class("note unread")
    await expect(bob.locator("#unread-count")).to_have_text("1")
    await newer.click()
    await expect(bob.locator("#unread-count")).to_have_attribute("data-count", "0")


async def test_a_saved_token_the_services_refuse_is_replaced(
    browser: Browser, site: Site, settings: Settings
) -> None:
    gateway, _ = site
    bob = await open_as(browser, gateway, "bob")
    # Signed for a user id that no longer exists, as after the user was removed
    # and added again; it has days left to run.
    refused = issue_token(10**9, "bob", settings)
    await bob.evaluate(
        "(token) => localStorage.setItem('notiflow.session', "
        "JSON.stringify({username: 'bob', token}))",
        refused,
    )

    await bob.reload()

    await expect(bob.locator("#status")).to_have_text("live", timeout=20_000)
    saved = await bob.evaluate(
        "() => JSON.parse(localStorage.getItem('notiflow.session')).token"
    )
    assert saved != refused
    await expect(bob.locator("#prefs input[name=email]")).to_be_checked()


@pytest.mark.parametrize("width", [1280, 390])
async def test_long_words_and_names_wrap_inside_the_page(
    browser: Browser, site: Site, settings: Settings, width: int
) -> None:
    gateway, demo = site
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(
            "UPDATE users SET display_name = $1 WHERE id = $2",
            "Verylongdisplayname" * 12,
            demo.carol,
        )
    finally:
        await conn.close()
    carol = await open_as(browser, gateway, "carol")
    await comment(carol, "@bob " + "x" * 400)
    context = await browser.new_context(viewport={"width": width, "height": 800})
    bob = await context.new_page()

    await bob.goto(f"{gateway.url}/?user=bob")
    await expect(bob.locator("#live-notes .note")).to_have_count(1)
    await expect(bob.locator("#comments")).to_contain_text("x" * 50)

    page_width = await bob.evaluate("() => document.documentElement.scrollWidth")
    assert page_width <= width
    bell = await bob.locator("#bell").bounding_box()
    assert bell is not None and bell["x"] + bell["width"] <= width


async def test_a_link_to_a_comment_shows_that_comment(
    browser: Browser, site: Site, settings: Settings
) -> None:
    gateway, demo = site
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(
            "INSERT INTO comments (post_id, author_id, body) "
            "SELECT $1, $2, 'filler ' || n FROM generate_series(1, 80) n ORDER BY n",
            demo.post,
            demo.carol,
        )
        last = await conn.fetchval(
            "SELECT max(id) FROM comments WHERE post_id = $1", demo.post
        )
    finally:
        await conn.close()
    context = await browser.new_context(viewport={"width": 1100, "height": 700})
    page = await context.new_page()

    await page.goto(f"{gateway.url}/?user=bob&post={demo.post}#comment-{last}")

    linked = page.locator(f"#comment-{last}")
    await expect(linked).to_contain_text("filler 80")
    await expect(linked).to_be_in_viewport()
    await expect(page.locator("#comment-1")).not_to_be_in_viewport()


async def test_an_inbox_error_is_said_beside_the_inbox_and_goes_once_it_answers(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    bob = await open_as(browser, gateway, "bob")
    carol = await open_as(browser, gateway, "carol")
    await comment(carol, "@bob look")
    note = bob.locator("#live-notes .note").first
    await expect(note).to_have_class("note unread")

    async def unreachable(route: Route) -> None:
        await route.abort()

    await bob.route("**/inbox/*/read", unreachable)
    await note.click()
    await expect(bob.locator("#inbox-error")).to_contain_text("Could not reach")
    await expect(bob.locator("#form-error")).to_have_text("")
    # Not read after all: it can be clicked again.
    await expect(note).to_have_class("note unread")

    await bob.unroute("**/inbox/*/read")
    await note.click()
    await expect(bob.locator("#unread-count")).to_have_attribute("data-count", "0")
    await expect(bob.locator("#inbox-error")).to_be_hidden()


@pytest.mark.parametrize("width", [1280, 390, 360])
async def test_the_notification_panel_opens_inside_the_screen(
    browser: Browser, site: Site, width: int
) -> None:
    gateway, _ = site
    context = await browser.new_context(viewport={"width": width, "height": 800})
    bob = await context.new_page()
    await bob.goto(f"{gateway.url}/?user=bob")
    await expect(bob.locator("#status")).to_have_text("live")

    await bob.click("#bell")

    panel = await bob.locator("#panel").bounding_box()
    bell = await bob.locator("#bell").bounding_box()
    assert panel is not None and bell is not None
    assert panel["x"] >= 0 and panel["x"] + panel["width"] <= width, panel
    assert panel["y"] >= bell["y"] + bell["height"], (panel, bell)
    await expect(bob.locator("#panel h2")).to_be_in_viewport(ratio=1)
