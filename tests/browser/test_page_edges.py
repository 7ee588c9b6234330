"""The demo page where its requests cross live changes, its token stops being
accepted, people write long words, a link names a comment, or the inbox cannot be
reached for a moment."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from playwright.async_api import Browser, Route, expect

from contracts.auth import issue_token, unsubscribe_token
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


async def test_a_comment_sent_again_after_its_answer_was_lost_is_stored_once(
    browser: Browser, site: Site, settings: Settings
) -> None:
    gateway, _ = site
    carol = await open_as(browser, gateway, "carol")
    keys: list[str | None] = []

    async def lose_the_first_answer(route: Route) -> None:
        if route.request.method != "POST":
            await route.continue_()
            return
        keys.append(await route.request.header_value("idempotency-key"))
        if len(keys) > 1:
            await route.continue_()
            return
        # The comment is stored, and its answer never reaches the page.
        await route.fetch()
        await route.abort("connectionreset")

    await carol.route("**/comments", lose_the_first_answer)
    await carol.fill("#comment-body", "said once, sent twice")
    await carol.click("#comment-submit")
    await expect(carol.locator("#form-error")).not_to_be_empty()
    await expect(carol.locator("#comment-body")).to_have_value("said once, sent twice")
    await carol.click("#comment-submit")

    await expect(carol.locator("#comment-body")).to_have_value("")
    await expect(carol.locator("#comments")).to_contain_text("said once, sent twice")
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM comments WHERE body = 'said once, sent twice'"
        )
    finally:
        await conn.close()
    assert stored == 1
    assert len(keys) == 2 and keys[0] is not None and keys[0] == keys[1]

    # Another comment is another key.
    await comment(carol, "a second thought")
    assert len(keys) == 3 and keys[2] != keys[0]


async def test_an_inbox_answer_for_the_previous_user_is_not_shown_after_switching(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    carol = await open_as(browser, gateway, "carol")
    bob = await open_as(browser, gateway, "bob")
    await comment(carol, "@bob for bob only")
    await expect(bob.locator("#unread-count")).to_have_text("1")

    page = await (await browser.new_context()).new_page()
    fetched = asyncio.Event()
    release = asyncio.Event()
    answered = asyncio.Event()

    async def hold_the_first(route: Route) -> None:
        if fetched.is_set():
            await route.continue_()
            return
        response = await route.fetch()
        fetched.set()
        await release.wait()
        await route.fulfill(response=response)
        answered.set()

    # Bob's first inbox page is held until the page has switched to dave.
    await page.route("**/inbox?*", hold_the_first)
    await page.goto(f"{gateway.url}/?user=bob")
    await asyncio.wait_for(fetched.wait(), 20)
    await page.select_option("#user-select", "dave")
    await expect(page.locator("#status")).to_have_text("live")
    await expect(page.locator("#user-select")).to_have_value("dave")
    release.set()
    await asyncio.wait_for(answered.wait(), 10)
    # What the page does with an answer it has, it does within this time.
    await page.wait_for_timeout(500)

    await page.click("#bell")
    await expect(page.locator("#notifications")).not_to_contain_text("for bob only")
    await expect(page.locator("#unread-count")).to_have_attribute("data-count", "0")


async def test_the_last_user_chosen_is_signed_in_though_an_earlier_token_comes_late(
    browser: Browser, site: Site, settings: Settings
) -> None:
    gateway, demo = site
    page = await open_as(browser, gateway, "bob")

    async def carol_late(route: Route) -> None:
        body = route.request.post_data or ""
        if '"carol"' in body:
            response = await route.fetch()
            await asyncio.sleep(2)
            await route.fulfill(response=response)
        else:
            await route.continue_()

    await page.route("**/dev/token", carol_late)
    await page.select_option("#user-select", "carol")
    await page.wait_for_timeout(300)
    await page.select_option("#user-select", "dave")
    await expect(page.locator("#status")).to_have_text("live")
    # Carol's token has come and gone.
    await page.wait_for_timeout(2500)

    assert await page.evaluate("() => window.notiflow.username") == "dave"
    assert await page.evaluate("() => localStorage.getItem('notiflow.user')") == "dave"
    await comment(page, "signed in as the last one chosen")
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        author = await conn.fetchval(
            "SELECT author_id FROM comments WHERE body = $1",
            "signed in as the last one chosen",
        )
    finally:
        await conn.close()
    assert author == demo.dave


async def test_another_site_cannot_frame_the_page_or_an_unsubscribe_link(
    browser: Browser, site: Site, settings: Settings
) -> None:
    gateway, demo = site
    link = f"{gateway.url}/unsubscribe?token=" + unsubscribe_token(
        demo.bob, settings.secret_key
    )
    framing = (
        f'<iframe id="page" src="{gateway.url}/"></iframe>'
        f'<iframe id="link" src="{link}"></iframe>'
    ).encode()

    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
            + f"Content-Length: {len(framing)}\r\n\r\n".encode()
            + framing
        )
        await writer.drain()
        writer.close()

    # A page of another origin on this machine, framing both.
    elsewhere = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = elsewhere.sockets[0].getsockname()[1]
    page = await (await browser.new_context()).new_page()
    refused: list[str] = []
    page.on("console", lambda m: refused.append(m.text) if "frame" in m.text else None)
    try:
        await page.goto(f"http://127.0.0.1:{port}/")
        await page.wait_for_timeout(1500)
    finally:
        elsewhere.close()

    # Refused, the frames show the browser's error page in place of the gateway's.
    framed = [f.url for f in page.frames if f is not page.main_frame]
    assert framed == ["chrome-error://chromewebdata/"] * 2
    assert len(refused) == 2, refused


async def test_switching_users_tells_the_push_controls_who_was_signed_in_before(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    context = await browser.new_context()
    await context.add_init_script(
        """window.__signedIn = [];
        window.addEventListener("notiflow:signed-in", (e) =>
            window.__signedIn.push([window.notiflow.token, e.detail.previous]));"""
    )
    page = await context.new_page()
    await page.goto(f"{gateway.url}/?user=bob")
    await expect(page.locator("#status")).to_have_text("live")
    bob = await page.evaluate("window.notiflow.token")

    await page.select_option("#user-select", "dave")
    await expect(page.locator("#status")).to_have_text("live")

    dave = await page.evaluate("window.notiflow.token")
    assert dave != bob
    assert (await page.evaluate("window.__signedIn"))[-1] == [dave, bob]
    await context.close()


async def test_a_token_in_the_pages_address_is_never_sent_on_as_a_referer(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    page = await (await browser.new_context()).new_page()
    referers: list[str] = []
    page.on(
        "request",
        lambda r: referers.append(r.headers.get("referer", "")),
    )

    await page.goto(f"{gateway.url}/?user=bob&token=secret-in-the-link")
    await expect(page.locator("#status")).to_have_text("live")

    assert len(referers) > 3
    assert not [r for r in referers if "secret-in-the-link" in r]
