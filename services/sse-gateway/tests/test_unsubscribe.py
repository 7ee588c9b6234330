"""The unsubscribe link of notification emails, through the gateway, on the real
PostgreSQL: what it shows, what it turns off, and what it refuses."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from contracts.auth import issue_token, unsubscribe_token
from contracts.settings import Settings
from sse_gateway.app import GatewaySettings, create_app
from tests.support.data import Demo

pytestmark = pytest.mark.integration

# What a mail client sends for a one-click unsubscribe (RFC 8058).
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ONE_CLICK = {"content": b"List-Unsubscribe=One-Click", "headers": FORM}
BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
STORED = "SELECT type, enabled FROM notification_preferences WHERE user_id = $1"
EVERY_ROW = "SELECT user_id, type, enabled FROM notification_preferences ORDER BY 1, 2"


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A running gateway, called with no credentials at all, as a mail client."""
    app = create_app(GatewaySettings(**settings.model_dump()))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client,
    ):
        yield client


def link(settings: Settings, user_id: int) -> str:
    return f"/unsubscribe?token={unsubscribe_token(user_id, settings.secret_key)}"


async def stored(db: asyncpg.Connection, user_id: int) -> dict[str, bool]:
    return dict(await db.fetch(STORED, user_id))


async def test_the_page_says_whose_emails_it_turns_off_and_changes_nothing(
    gateway: httpx.AsyncClient, settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    page = await gateway.get(link(settings, demo.bob), headers=BROWSER)

    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert "Bob Dupont (b…@example.com)" in page.text
    assert "Turn off notification emails" in page.text
    assert '<form method="post"' in page.text
    assert page.headers["cache-control"] == "no-store"
    assert await db.fetch(EVERY_ROW) == []


async def test_the_page_of_someone_whose_emails_are_off_says_so_and_offers_no_button(
    gateway: httpx.AsyncClient, settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    await gateway.post(link(settings, demo.bob), **ONE_CLICK)

    page = await gateway.get(link(settings, demo.bob), headers=BROWSER)

    assert page.status_code == 200, page.text
    assert "Notification emails are already off" in page.text
    assert "Bob Dupont (b…@example.com)" in page.text
    assert "<form" not in page.text
    assert await db.fetch(EVERY_ROW) == [(demo.bob, "email", False)]


async def test_a_one_click_post_turns_email_off_and_leaves_the_rest_on(
    gateway: httpx.AsyncClient, settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    done = await gateway.post(link(settings, demo.bob), **ONE_CLICK)

    assert done.status_code == 200, done.text
    assert "turned off" in done.text
    assert await stored(db, demo.bob) == {"email": False}
    bearer = issue_token(demo.bob, "bob", settings)
    read = await gateway.get(
        "/preferences", headers={"Authorization": f"Bearer {bearer}"}
    )
    assert read.json() == {"email": False, "sse": True, "push": True}
    assert await db.fetch(EVERY_ROW) == [(demo.bob, "email", False)]


async def test_posting_the_link_again_is_answered_the_same_and_keeps_email_off(
    gateway: httpx.AsyncClient, settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    await db.execute(
        "INSERT INTO notification_preferences VALUES ($1, 'push', false)", demo.bob
    )

    answers = [
        await gateway.post(link(settings, demo.bob), **ONE_CLICK),
        await gateway.post(link(settings, demo.bob), **ONE_CLICK),
        # The page's button posts a form too; a client may also send no body.
        await gateway.post(link(settings, demo.bob)),
    ]

    assert [a.status_code for a in answers] == [200, 200, 200]
    assert await stored(db, demo.bob) == {"email": False, "push": False}


async def test_the_change_is_logged_for_operators_as_coming_from_the_link(
    gateway: httpx.AsyncClient,
    settings: Settings,
    demo: Demo,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("INFO", logger="sse_gateway.unsubscribe"):
        await gateway.get(link(settings, demo.bob))
        await gateway.post(link(settings, demo.bob), **ONE_CLICK)
        # Email is off already: nothing changes, and nothing is logged as changed.
        await gateway.post(link(settings, demo.bob), **ONE_CLICK)

    changed = [
        r for r in caplog.records if getattr(r, "action", None) == "preferences.changed"
    ]
    assert len(changed) == 1, "only the first POST changes anything"
    assert changed[0].user_id == demo.bob
    assert changed[0].via == "unsubscribe_link"
    assert "unsubscribe link" in changed[0].getMessage()


def _refused_tokens(settings: Settings, bob: int) -> list[tuple[str, str]]:
    """(query, what the answer says), for links that are not genuine."""
    genuine = unsubscribe_token(bob, settings.secret_key)
    other_secret = unsubscribe_token(bob, "another-secret-" + "x" * 32)
    bearer = issue_token(bob, "bob", settings)
    changed = "A" if genuine[-5] != "A" else "B"
    tampered = genuine[:-5] + changed + genuine[-4:]
    return [
        ("", "the token is missing"),
        ("?token=", "the token is missing"),
        ("?token=nonsense", "not an unsubscribe link's token"),
        (f"?token={genuine[:-3]}", "not an unsubscribe link's token"),
        (f"?token={other_secret}", "signature does not match"),
        (f"?token={bearer}", "not an unsubscribe link's token"),
        (f"?token={tampered}", "signature does not match"),
        (f"?token={genuine}&token={genuine}", "the token is given more than once"),
    ]


async def test_a_link_that_is_not_genuine_is_refused_naming_the_token(
    gateway: httpx.AsyncClient, settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    for query, says in _refused_tokens(settings, demo.bob):
        for answer in (
            await gateway.get(f"/unsubscribe{query}"),
            await gateway.post(f"/unsubscribe{query}", **ONE_CLICK),
        ):
            assert answer.status_code == 422, (query, answer.text)
            body = answer.json()
            assert body["error"] == "invalid_request", query
            assert body["fields"][0]["field"] == "token", query
            assert says in body["fields"][0]["message"], (query, body)

    assert await db.fetch(EVERY_ROW) == []


async def test_a_browser_is_told_on_a_page_that_the_link_is_broken(
    gateway: httpx.AsyncClient, demo: Demo, db: asyncpg.Connection
) -> None:
    answer = await gateway.post("/unsubscribe?token=nonsense", headers=BROWSER)

    assert answer.status_code == 422
    assert answer.headers["content-type"].startswith("text/html")
    assert "The link&#x27;s token is not an unsubscribe link&#x27;s token" in (
        answer.text
    )
    assert await db.fetch(EVERY_ROW) == []


async def test_a_link_for_a_user_who_no_longer_exists_is_404_and_changes_nothing(
    gateway: httpx.AsyncClient, settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    ghost = max(demo.alice, demo.bob, demo.carol, demo.dave) + 1000
    detail = f"the token names user {ghost}, who does not exist"

    answers = [
        await gateway.get(link(settings, ghost)),
        await gateway.post(link(settings, ghost), **ONE_CLICK),
    ]

    for answer in answers:
        assert answer.status_code == 404, answer.text
        assert answer.json() == {"error": "not_found", "detail": detail}
    assert await db.fetch(EVERY_ROW) == []


async def test_a_link_token_is_not_taken_as_a_bearer_token(
    gateway: httpx.AsyncClient, settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    token = unsubscribe_token(demo.bob, settings.secret_key)

    read = await gateway.get(f"/preferences?token={token}")
    changed = await gateway.patch(f"/preferences?token={token}", json={"email": False})

    assert read.status_code == 401
    assert changed.status_code == 401
    assert await db.fetch(EVERY_ROW) == []


async def test_a_bearer_token_in_the_header_does_not_unsubscribe_anyone(
    gateway: httpx.AsyncClient, settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    bearer = issue_token(demo.bob, "bob", settings)

    answer = await gateway.post(
        "/unsubscribe",
        content=b"List-Unsubscribe=One-Click",
        headers={**FORM, "Authorization": f"Bearer {bearer}"},
    )

    assert answer.status_code == 422
    assert "the token is missing" in answer.json()["detail"]
    assert await db.fetch(EVERY_ROW) == []
