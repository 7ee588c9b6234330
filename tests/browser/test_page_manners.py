"""Small manners of the demo page: the panel closes with Escape, a notification's
preview shows the comment under its title, the comment hint names other people,
and a link to a post that is gone says so."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from playwright.async_api import Browser, Route, expect

from contracts.auth import issue_token
from contracts.settings import Settings
from tests.browser.test_live_page import Site, comment, open_as

pytestmark = pytest.mark.e2e

# Notifications in a burst: under the comments a user may post in a minute.
BURST = 24


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


async def test_two_notices_due_at_once_are_both_shown_and_taken_down_one_by_one(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    page = await (await browser.new_context()).new_page()

    await page.goto(f"{gateway.url}/?user=mallory&post=987654")

    lines = page.locator("#notice p")
    await expect(page.locator("#post-title")).to_have_text("Welcome to notiflow")
    await expect(lines).to_have_count(2)
    await expect(page.locator("#notice")).to_contain_text("There is no user “mallory”")
    await expect(page.locator("#notice")).to_contain_text(
        "The link asks for post 987654, which does not exist"
    )

    # Choosing a user answers what was said of the link's user, not of its post.
    await page.select_option("#user-select", "carol")
    await expect(page.locator("#status")).to_have_text("live")
    await expect(lines).to_have_count(1)
    await expect(lines).to_contain_text("The link asks for post 987654")


async def test_a_page_opened_while_the_comments_api_is_away_signs_in_once_it_answers(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    api = gateway._env["NOTIFLOW_API_BASE_URL"]
    page = await (await browser.new_context()).new_page()
    await page.route(f"{api}/**", lambda route: route.abort())

    await page.goto(f"{gateway.url}/?user=bob")
    await expect(page.locator("#notice")).to_contain_text("Could not reach")
    await expect(page.locator("#status")).to_have_text("offline")
    await page.unroute(f"{api}/**")

    # The page asks again every 5 s: it lists the users, signs in, and goes live.
    await expect(page.locator("#status")).to_have_text("live", timeout=20_000)
    await expect(page.locator("#user-select")).to_have_value("bob")
    await expect(page.locator("#notice")).to_be_hidden()
    await expect(page.locator("#post-title")).to_have_text("Welcome to notiflow")


async def _carol_comments(site: Site, settings: Settings, *bodies: str) -> None:
    """Carol posts ``bodies`` on the demo post, through the comments API itself."""
    gateway, demo = site
    token = issue_token(demo.carol, "carol", settings)
    async with httpx.AsyncClient(
        base_url=gateway._env["NOTIFLOW_API_BASE_URL"],
        headers={"Authorization": f"Bearer {token}"},
    ) as carol:
        for body in bodies:
            answer = await carol.post(
                "/comments", json={"post_id": demo.post, "body": body}
            )
            assert answer.status_code == 201, answer.text


async def test_a_burst_of_notifications_reads_the_thread_once_per_burst(
    browser: Browser, site: Site, settings: Settings
) -> None:
    gateway, demo = site
    api = gateway._env["NOTIFLOW_API_BASE_URL"]
    bob = await open_as(browser, gateway, "bob")
    reads = 0

    async def slow_read(route: Route) -> None:
        # Each read of the thread takes half a second: what comes meanwhile waits.
        nonlocal reads
        reads += 1
        response = await route.fetch()
        await asyncio.sleep(0.5)
        await route.fulfill(response=response)

    await bob.route(f"{api}/posts/{demo.post}", slow_read)
    await _carol_comments(site, settings, *(f"@bob number {n}" for n in range(BURST)))

    await expect(bob.locator("#unread-count")).to_have_text(str(BURST))
    await expect(bob.locator("#comments .comment")).to_have_count(BURST)
    await expect(bob.locator("#comments")).to_contain_text(f"@bob number {BURST - 1}")
    assert reads < BURST / 2, reads


HIDE = """(hidden) => {
  Object.defineProperty(document, "hidden", { configurable: true, get: () => hidden });
  Object.defineProperty(document, "visibilityState", {
    configurable: true, get: () => (hidden ? "hidden" : "visible"),
  });
  document.dispatchEvent(new Event("visibilitychange"));
}"""


async def _open_streams(gateway_url: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{gateway_url}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("notiflow_sse_connections ")
    )


async def test_a_page_in_a_background_tab_gives_up_its_stream_and_keeps_its_count(
    browser: Browser, site: Site, settings: Settings
) -> None:
    gateway, _ = site
    context = await browser.new_context()
    await context.add_init_script(
        "window.notiflow = { hiddenCloseMs: 300, hiddenPollMs: 300 };"
    )
    bob = await context.new_page()
    await bob.goto(f"{gateway.url}/?user=bob")
    await expect(bob.locator("#status")).to_have_text("live")
    assert await _open_streams(gateway.url) == 1

    await bob.evaluate(HIDE, True)
    await expect(bob.locator("#status")).to_have_text("paused")
    streams_while_hidden = await _open_streams(gateway.url)
    await _carol_comments(site, settings, "@bob while away")
    # The tab's title keeps counting, from the unread count it asks for.
    await expect(bob).to_have_title("(1) notiflow", timeout=20_000)

    await bob.evaluate(HIDE, False)
    await expect(bob.locator("#status")).to_have_text("live")
    await expect(bob.locator("#live-notes .note").first).to_contain_text("while away")

    assert streams_while_hidden == 0


async def test_clicking_an_unread_notification_keeps_the_panel_open(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    bob = await open_as(browser, gateway, "bob")
    carol = await open_as(browser, gateway, "carol")
    await comment(carol, "@bob look here")
    await expect(bob.locator("#unread-count")).to_have_text("1")
    await bob.click("#bell")

    await bob.locator("#notifications .note").first.click()

    await expect(bob.locator("#unread-count")).to_have_attribute("data-count", "0")
    await expect(bob.locator("#panel")).to_be_visible()
    await expect(bob.locator("#notifications .note").first).to_be_focused()


async def test_a_user_switch_the_api_could_not_finish_is_finished_when_it_answers(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    api = gateway._env["NOTIFLOW_API_BASE_URL"]
    page = await open_as(browser, gateway, "bob")
    await page.route(f"{api}/**", lambda route: route.abort())

    await page.select_option("#user-select", "carol")
    await expect(page.locator("#notice")).to_contain_text("Could not reach")
    await page.fill("#comment-body", "who am I?")
    await page.click("#comment-submit")
    await expect(page.locator("#form-error")).to_contain_text("Not signed in yet")
    await page.unroute(f"{api}/**")

    await expect(page.locator("#status")).to_have_text("live", timeout=20_000)
    assert await page.evaluate("() => window.notiflow.username") == "carol"
    await expect(page.locator("#comment-hint")).to_contain_text("@bob")
    await page.click("#comment-submit")
    await expect(page.locator("#comments .comment").last).to_contain_text("who am I?")
    await expect(page.locator("#comments .comment").last).to_contain_text("Carol")


async def test_keyboard_users_keep_their_place_as_controls_wait_on_the_server(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    bob = await open_as(browser, gateway, "bob")
    carol = await open_as(browser, gateway, "carol")
    saved = asyncio.Event()

    async def slow(route: Route) -> None:
        if route.request.method == "PATCH":
            await asyncio.sleep(0.5)
        await route.continue_()
        saved.set()

    await bob.route("**/preferences", slow)
    email = bob.get_by_role("group", name="Notify me by").get_by_role(
        "checkbox", name="Email"
    )
    await email.focus()
    await bob.keyboard.press("Space")
    # Asked again while the first is in flight: taken for nothing, the focus kept.
    await bob.keyboard.press("Space")
    await expect(email).to_be_focused()
    await expect(email).not_to_be_checked()
    await saved.wait()
    await expect(email).to_be_enabled()
    await expect(email).to_be_focused()
    await bob.keyboard.press("Space")
    await expect(email).to_be_checked()

    # Ctrl+Enter posts from the text box, which keeps the focus.
    await carol.focus("#comment-body")
    await carol.keyboard.type("@bob keyboard only")
    await carol.keyboard.press("Control+Enter")
    await expect(carol.locator("#comments")).to_contain_text("@bob keyboard only")
    await expect(carol.locator("#comment-body")).to_be_focused()
    # Enter on the button posts too, and hands the focus back to the text box.
    await carol.keyboard.type("@bob again")
    await carol.focus("#comment-submit")
    await carol.keyboard.press("Enter")
    await expect(carol.locator("#comments")).to_contain_text("@bob again")
    await expect(carol.locator("#comment-body")).to_be_focused()

    # Mark all read, by keyboard, leaves the focus in the panel it acted on.
    await expect(bob.locator("#unread-count")).to_have_text("2")
    await bob.click("#bell")
    await bob.focus("#mark-all")
    await bob.keyboard.press("Enter")
    await expect(bob.locator("#unread-count")).to_have_text("0")
    in_panel = "document.activeElement.closest('#panel, #bell') !== null"
    assert await bob.evaluate(in_panel)


async def test_a_comment_the_api_could_not_take_says_so_until_the_api_is_back(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    api = gateway._env["NOTIFLOW_API_BASE_URL"]
    carol = await open_as(browser, gateway, "carol")
    await carol.route(f"{api}/**", lambda route: route.abort())

    await carol.fill("#comment-body", "while the API is away")
    await carol.click("#comment-submit")
    await expect(carol.locator("#form-error")).to_contain_text("Could not reach")
    await expect(carol.locator("#notice")).to_contain_text("Could not reach")
    await carol.unroute(f"{api}/**")

    # Asked again every 5 s: both go once it answers, the text kept to send.
    await expect(carol.locator("#notice")).to_be_hidden(timeout=20_000)
    await expect(carol.locator("#form-error")).to_be_empty()
    await expect(carol.locator("#comment-body")).to_have_value("while the API is away")
