"""Small manners of the demo page: the panel closes with Escape, a notification's
preview shows the comment under its title, the comment hint names other people,
and a link to a post that is gone says so."""

from __future__ import annotations

import pytest
from playwright.async_api import Browser, expect

from tests.browser.test_live_page import Site, comment, open_as

pytestmark = pytest.mark.e2e


async def test_escape_closes_the_notification_panel_and_gives_the_bell_focus(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    bob = await open_as(browser, gateway, "bob")
    await bob.click("#bell")
    await expect(bob.locator("#panel")).to_be_visible()
    await bob.focus("#mark-all")

    await bob.keyboard.press("Escape")

    await expect(bob.locator("#panel")).to_be_hidden()
    await expect(bob.locator("#bell")).to_have_attribute("aria-expanded", "false")
    await expect(bob.locator("#bell")).to_be_focused()


async def test_a_notification_shows_the_comment_under_a_title_saying_who_and_where(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    bob = await open_as(browser, gateway, "bob")
    carol = await open_as(browser, gateway, "carol")

    await comment(carol, "Have you seen this, @bob?")

    note = bob.locator("#live-notes .note").first
    await expect(note.locator(".note-title")).to_have_text(
        "Zoë 🚀 Carol mentioned you on “Welcome to notiflow”"
    )
    await expect(note.locator(".note-text")).to_have_text("Have you seen this, @bob?")


async def test_the_comment_hint_names_people_other_than_the_signed_in_user(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    bob = await open_as(browser, gateway, "bob")
    carol = await open_as(browser, gateway, "carol")

    bob_hint = await bob.locator("#comment-hint").text_content()
    carol_hint = await carol.locator("#comment-hint").text_content()

    assert bob_hint == "Add a comment — mention someone with @alice, @carol or @dave"
    assert carol_hint == "Add a comment — mention someone with @alice, @bob or @dave"


async def test_a_link_to_a_missing_post_says_so_above_the_post_shown_instead(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    context = await browser.new_context()
    page = await context.new_page()

    await page.goto(f"{gateway.url}/?user=bob&post=987654")

    await expect(page.locator("#post-title")).to_have_text("Welcome to notiflow")
    await expect(page.locator("#notice")).to_be_visible()
    await expect(page.locator("#notice")).to_have_text(
        "The link asks for post 987654, which does not exist; "
        "this is “Welcome to notiflow” instead."
    )
