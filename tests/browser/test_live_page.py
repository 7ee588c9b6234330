"""Two people on the demo page: a mention reaches the other's bell and list live,
read state follows the user across tabs, and a reload loses nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import httpx
import pytest
from playwright.async_api import Browser, Page, Route, expect

from contracts.auth import issue_token
from contracts.settings import Settings
from tests.browser.conftest import Platform
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


async def _unread_and_visible(database_url: str, user_id: int) -> tuple[int, set[int]]:
    """The user's unread count and the ids of their inbox as the server has them."""
    conn = await asyncpg.connect(database_url)
    try:
        unread = await conn.fetchval(
            "SELECT unread FROM inbox_sequences WHERE user_id = $1", user_id
        )
        ids = await conn.fetch(
            "SELECT id FROM notifications WHERE user_id = $1 "
            "AND inbox_seq IS NOT NULL AND archived_at IS NULL",
            user_id,
        )
    finally:
        await conn.close()
    return unread, {row["id"] for row in ids}


async def _shown(page: Page) -> set[int]:
    ids = await page.locator("#notifications .note").evaluate_all(
        "(items) => items.map((item) => Number(item.dataset.id))"
    )
    return set(ids)


async def _bob_mentioned_twice(
    browser: Browser, site: Site, settings: Settings
) -> tuple[Page, set[int]]:
    """Bob's page, once two mentions by carol have reached it; their ids."""
    gateway, demo = site
    bob = await open_as(browser, gateway, "bob")
    carol = await open_as(browser, gateway, "carol")
    await comment(carol, "@bob first")
    await comment(carol, "@bob second")
    await expect(bob.locator("#unread-count")).to_have_text("2")
    _, ids = await _unread_and_visible(settings.database_url, demo.bob)
    return bob, ids


async def _post_as_bob(
    gateway: Service, settings: Settings, demo: Demo, path: str
) -> httpx.Response:
    token = issue_token(demo.bob, "bob", settings)
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        return await client.post(path, headers={"Authorization": f"Bearer {token}"})


async def test_a_notification_archived_while_the_stream_was_down_leaves_the_page(
    browser: Browser, site: Site, settings: Settings, tmp_path: Path
) -> None:
    gateway, demo = site
    bob, both = await _bob_mentioned_twice(browser, site, settings)
    gone = max(both)

    # Bob's stream is cut; meanwhile another replica archives a notification,
    # which this page never hears of.
    gateway.kill()
    await expect(bob.locator("#status")).not_to_have_text("live")
    other = Service("sse-gateway", gateway._env, tmp_path).start()
    try:
        other.wait_ready()
        archived = await _post_as_bob(other, settings, demo, f"/inbox/{gone}/archive")
        assert archived.status_code == 200
    finally:
        other.stop()
    gateway.start().wait_ready()

    await expect(bob.locator("#status")).to_have_text("live", timeout=15_000)
    await expect(bob.locator("#notifications .note")).to_have_count(1)
    unread, visible = await _unread_and_visible(settings.database_url, demo.bob)
    assert await _shown(bob) == visible == both - {gone}
    await expect(bob.locator("#unread-count")).to_have_text(str(unread))


async def test_the_answer_to_a_read_never_puts_back_an_older_count(
    browser: Browser, site: Site, settings: Settings
) -> None:
    gateway, demo = site
    bob, ids = await _bob_mentioned_twice(browser, site, settings)
    clicked, elsewhere = sorted(ids)

    # The answer to this page's read is held back until a later read, made
    # elsewhere, has reached the page live.
    fetched = asyncio.Event()
    release = asyncio.Event()
    answered = asyncio.Event()

    async def hold(route: Route) -> None:
        response = await route.fetch()
        fetched.set()
        await release.wait()
        await route.fulfill(response=response)
        answered.set()

    await bob.route(f"**/inbox/{clicked}/read", hold)
    await bob.locator(f'#live-notes .note[data-id="{clicked}"]').click()
    await asyncio.wait_for(fetched.wait(), 10)
    read = await _post_as_bob(gateway, settings, demo, f"/inbox/{elsewhere}/read")
    assert read.json()["unread"] == 0
    await expect(bob.locator("#unread-count")).to_have_text("0")

    release.set()
    await asyncio.wait_for(answered.wait(), 10)
    # The page now has the held answer, whose count (1) is older than what it
    # showed; give it a moment to act on it.
    await bob.wait_for_timeout(1000)

    await expect(bob.locator("#unread-count")).to_have_text("0")
    assert await bob.locator("#unread-count").get_attribute("data-count") == "0"


async def test_a_page_past_the_users_stream_limit_says_so_and_goes_live_later(
    browser: Browser, site: Site
) -> None:
    gateway, _ = site
    gateway.stop()
    gateway._env["NOTIFLOW_SSE_MAX_STREAMS_PER_USER"] = "1"
    gateway.start().wait_ready()
    first = await open_as(browser, gateway, "bob")
    carol = await open_as(browser, gateway, "carol")
    await comment(carol, "@bob are you there?")
    await expect(first.locator("#unread-count")).to_have_text("1")

    second = await (await browser.new_context()).new_page()
    await second.goto(f"{gateway.url}/?user=bob")

    await expect(second.locator("#notice")).to_contain_text("Live updates are paused")
    await expect(second.locator("#status")).to_have_text("paused")
    # The inbox is shown as it is, though not live.
    await expect(second.locator("#unread-count")).to_have_text("1")
    await expect(second.locator("#notifications .note")).to_have_count(1)

    await first.close()
    await expect(second.locator("#status")).to_have_text("live", timeout=20_000)
    await expect(second.locator("#notice")).to_be_hidden()


async def test_a_page_whose_platform_comes_back_drops_its_unreachable_notice(
    browser: Browser, platform: Platform, settings: Settings
) -> None:
    page = await open_as(browser, platform.gateway, "bob")

    # Stopped, then started again with the gateway up before the comments API: the
    # stream comes back first, and the page finds the API gone.
    platform.comments.stop()
    platform.gateway.stop()
    await expect(page.locator("#status")).not_to_have_text("live")
    platform.gateway.start().wait_ready()
    await expect(page.locator("#status")).to_have_text("live", timeout=20_000)
    await expect(page.locator("#notice")).to_contain_text(
        "Could not reach the comments API"
    )
    # Someone else's comment, written meanwhile.
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        await conn.execute(
            "INSERT INTO comments (post_id, author_id, body) "
            "VALUES ($1, $2, 'Written while you were away')",
            platform.demo.post,
            platform.demo.carol,
        )
    finally:
        await conn.close()
    platform.comments.start().wait_ready()

    await expect(page.locator("#notice")).to_be_hidden(timeout=15_000)
    await expect(page.locator("#comments")).to_contain_text(
        "Written while you were away"
    )
