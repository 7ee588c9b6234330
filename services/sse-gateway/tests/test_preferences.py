"""A user's channel preferences through the gateway, on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest

from contracts.auth import UnknownUser, issue_token
from contracts.settings import Settings
from sse_gateway import inbox, preferences
from sse_gateway.app import GatewaySettings, create_app
from tests.support.data import Demo

pytestmark = pytest.mark.integration

JSON = {"Content-Type": "application/json"}
EVERYTHING = {"email": True, "sse": True, "push": True}
STORED = (
    "SELECT type, enabled FROM notification_preferences WHERE user_id = $1 "
    "ORDER BY type"
)

Client = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def client(settings: Settings) -> Client:
    """``async with client(user_id) as c`` calls a running gateway as that user."""

    @asynccontextmanager
    async def start(user_id: int, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(GatewaySettings(**{**settings.model_dump(), **options}))
        token = issue_token(user_id, "someone", settings)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://t",
                headers={"Authorization": f"Bearer {token}"},
            ) as c,
        ):
            yield c

    return start


async def stored(db: asyncpg.Connection, user_id: int) -> dict[str, bool]:
    return {row["type"]: row["enabled"] for row in await db.fetch(STORED, user_id)}


def logged_changes(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The lines logged for operators as preference changes, in order."""
    return [
        r.getMessage()
        for r in caplog.records
        if getattr(r, "action", None) == "preferences.changed"
    ]


@asynccontextmanager
async def announcements(settings: Settings) -> AsyncIterator[list[str]]:
    """The kinds of the announcements the gateways' streams hear, once the
    block has ended."""
    heard: list[str] = []
    listener = await asyncpg.connect(settings.database_url)
    await listener.add_listener(
        inbox.NOTIFY_CHANNEL, lambda *args: heard.append(json.loads(args[-1])["kind"])
    )
    try:
        yield heard
        # A NOTIFY reaches a listener at commit; one more statement on the
        # listener's own connection lets anything sent arrive first.
        await listener.execute("SELECT 1")
    finally:
        await listener.close()


async def test_every_type_is_wanted_until_turned_off(
    client: Client, demo: Demo
) -> None:
    async with client(demo.bob) as bob:
        answer = await bob.get("/preferences")

    assert answer.status_code == 200, answer.text
    assert answer.json() == EVERYTHING


async def test_a_change_is_stored_and_read_back(
    client: Client, demo: Demo, db: asyncpg.Connection
) -> None:
    async with client(demo.bob) as bob:
        changed = await bob.patch("/preferences", json={"email": False})
        read = await bob.get("/preferences")

    expected = {"email": False, "sse": True, "push": True}
    assert changed.status_code == 200, changed.text
    assert changed.json() == expected
    assert read.json() == expected
    assert await stored(db, demo.bob) == {"email": False}


async def test_a_change_is_logged_for_operators_with_the_user_and_what_changed(
    client: Client, demo: Demo, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="sse_gateway.api"):
        async with client(demo.bob) as bob:
            await bob.patch("/preferences", json={"push": False, "email": True})
            await bob.patch("/preferences", json={"sse": "no"})

    changed = [
        r for r in caplog.records if getattr(r, "action", None) == "preferences.changed"
    ]
    assert len(changed) == 1, "a refused change is not logged as one"
    assert changed[0].user_id == demo.bob
    # Email was wanted already: only push changed.
    assert changed[0].getMessage() == (
        "preferences changed: push off; 0 waiting notifications skipped"
    )


async def test_setting_types_to_what_they_are_announces_and_logs_nothing(
    client: Client,
    demo: Demo,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with announcements(settings) as heard:
        with caplog.at_level("INFO", logger="sse_gateway.api"):
            async with client(demo.bob) as bob:
                # Wanted by default, then stored as wanted, then the same again.
                same = [
                    await bob.patch("/preferences", json={"email": True}),
                    await bob.patch("/preferences", json={"email": True}),
                ]
                off = await bob.patch(
                    "/preferences", json={"email": False, "sse": True}
                )
                again = await bob.patch("/preferences", json={"email": False})
    assert [a.status_code for a in [*same, off, again]] == [200] * 4
    assert again.json() == {"email": False, "sse": True, "push": True}
    assert heard == ["preferences"]
    changed = logged_changes(caplog)
    assert changed == [
        "preferences changed: email off; 0 waiting notifications skipped"
    ]


async def test_a_partial_change_keeps_the_other_types(
    client: Client, demo: Demo, db: asyncpg.Connection
) -> None:
    async with client(demo.bob) as bob:
        await bob.patch("/preferences", json={"email": False, "sse": False})
        second = await bob.patch("/preferences", json={"push": False})
        third = await bob.patch("/preferences", json={"email": True})
        read = await bob.get("/preferences")

    assert second.json() == {"email": False, "sse": False, "push": False}
    assert third.json() == {"email": True, "sse": False, "push": False}
    assert read.json() == third.json()
    assert await stored(db, demo.bob) == {"email": True, "push": False, "sse": False}


# A body, how it is sent, and the answer: 422 naming the field and what is wrong
# with it, or 415 for a body that is not sent as JSON.
REFUSED: list[tuple[bytes, dict[str, str], int, str | None, str | None]] = [
    (b'{"bogus": true}', JSON, 422, "bogus", "Extra inputs are not permitted"),
    (b'{"email": false, "Sse": false}', JSON, 422, "Sse", "Extra inputs"),
    (b'{"email": 0}', JSON, 422, "email", "must be true or false, not 0"),
    (b'{"email": 1}', JSON, 422, "email", "must be true or false, not 1"),
    (b'{"email": "false"}', JSON, 422, "email", 'must be true or false, not "false"'),
    (b'{"email": null}', JSON, 422, "email", "must be true or false, not null"),
    (b'{"email": [false]}', JSON, 422, "email", "must be true or false, not [false]"),
    (b'{"email": false, "sse": "off"}', JSON, 422, "sse", "must be true or false"),
    (b"{}", JSON, 422, "(request body)", "must name at least one of email, sse, push"),
    (b"[]", JSON, 422, "(request body)", "must be a JSON object, not an array"),
    (b"null", JSON, 422, "(request body)", "must be a JSON object, not null"),
    (b"false", JSON, 422, "(request body)", "must be a JSON object, not a boolean"),
    (b'"email"', JSON, 422, "(request body)", "must be a JSON object, not a string"),
    (b"{oops", JSON, 422, "(request body)", "is not valid JSON"),
    (b"", JSON, 422, "(request body)", "the request has no body"),
    (b'{"email": false, "email": true}', JSON, 422, "email", "more than once"),
    (b'{"email": false}', {"Content-Type": "text/plain"}, 415, None, None),
    (b'{"email": false}', {}, 415, None, None),
]


async def test_a_refused_change_names_the_field_and_stores_nothing(
    client: Client, demo: Demo, db: asyncpg.Connection
) -> None:
    await db.execute(
        "INSERT INTO notification_preferences VALUES ($1, 'push', false)", demo.bob
    )

    async with client(demo.bob) as bob:
        for content, headers, status, field, message in REFUSED:
            answer = await bob.patch("/preferences", content=content, headers=headers)

            assert answer.status_code == status, (content, answer.text)
            assert await stored(db, demo.bob) == {"push": False}, content
            body = answer.json()
            if status == 415:
                assert body["error"] == "unsupported_media_type"
                continue
            assert body["error"] == "invalid_request", content
            assert [f["field"] for f in body["fields"]] == [field], content
            assert message is not None, content
            assert message in body["fields"][0]["message"], body
        read = await bob.get("/preferences")

    assert read.json() == {"email": True, "sse": True, "push": False}


async def test_a_token_for_a_user_who_does_not_exist_gets_401_and_stores_nothing(
    client: Client, demo: Demo, db: asyncpg.Connection
) -> None:
    ghost_id = max(demo.alice, demo.bob, demo.carol, demo.dave) + 1000
    detail = f"the token names user {ghost_id}, who does not exist"

    async with client(ghost_id) as ghost:
        answers = [
            await ghost.get("/preferences"),
            await ghost.patch("/preferences", json={"email": False}),
            # The token is judged before the body.
            await ghost.patch("/preferences", json={"email": 0}),
        ]

    for answer in answers:
        assert answer.status_code == 401, answer.text
        assert answer.headers["www-authenticate"] == "Bearer"
        assert answer.json() == {"error": "unauthorized", "detail": detail}
    assert await db.fetchval("SELECT count(*) FROM notification_preferences") == 0


async def test_a_change_for_a_user_deleted_since_the_token_check_is_unknown_user(
    db: asyncpg.Connection, demo: Demo
) -> None:
    ghost_id = max(demo.alice, demo.bob, demo.carol, demo.dave) + 1000

    with pytest.raises(UnknownUser) as refused:
        await preferences.change(db, ghost_id, {"email": False, "push": True})

    assert refused.value.user_id == ghost_id
    assert await db.fetchval("SELECT count(*) FROM notification_preferences") == 0


async def test_a_missing_token_gets_401_whatever_the_body(
    client: Client, demo: Demo
) -> None:
    async with client(demo.bob) as bob:
        del bob.headers["Authorization"]
        answers = [
            await bob.get("/preferences"),
            await bob.patch("/preferences", json={"email": False}),
            await bob.patch("/preferences", json={"email": 0}),
            await bob.patch("/preferences", content=b"{oops", headers=JSON),
        ]

    assert [a.status_code for a in answers] == [401, 401, 401, 401]
    assert all(a.json()["error"] == "unauthorized" for a in answers)


@pytest.mark.parametrize("path", ["/preferences", "/inbox", "/inbox/unread-count"])
async def test_head_answers_a_read_route_as_get_does_without_a_body(
    client: Client, demo: Demo, path: str
) -> None:
    async with client(demo.bob) as bob:
        get = await bob.get(path)
        head = await bob.head(path)
        del bob.headers["Authorization"]
        anonymous = await bob.head(path)

    assert (get.status_code, head.status_code) == (200, 200), head.text
    assert head.headers == get.headers
    assert head.content == b"" and get.content
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert anonymous.content == b""


async def test_a_change_leaves_other_users_preferences_alone(
    client: Client, demo: Demo, db: asyncpg.Connection
) -> None:
    await db.execute(
        "INSERT INTO notification_preferences VALUES ($1, 'email', true), "
        "($1, 'sse', false)",
        demo.alice,
    )

    async with client(demo.bob) as bob:
        before = await bob.get("/preferences")
        await bob.patch("/preferences", json={"email": False, "sse": True})

    assert before.json() == EVERYTHING
    assert await stored(db, demo.alice) == {"email": True, "sse": False}
    assert await stored(db, demo.bob) == {"email": False, "sse": True}


async def test_a_page_on_an_allowed_origin_may_change_preferences(
    client: Client, demo: Demo
) -> None:
    page = "https://app.example"

    async with client(demo.bob, cors_origins=page) as bob:
        preflight = await bob.options(
            "/preferences",
            headers={
                "Origin": page,
                "Access-Control-Request-Method": "PATCH",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        changed = await bob.patch(
            "/preferences", json={"push": False}, headers={"Origin": page}
        )

    assert preflight.status_code == 200, preflight.text
    assert "PATCH" in preflight.headers["access-control-allow-methods"]
    assert changed.status_code == 200
    assert changed.headers["access-control-allow-origin"] == page


async def test_the_same_change_sent_many_times_at_once_is_announced_once(
    client: Client,
    demo: Demo,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with announcements(settings) as heard:
        with caplog.at_level("INFO", logger="sse_gateway.api"):
            async with client(demo.bob) as bob:
                # A page's click and a mail client's one-click unsubscribe, say.
                for value in (False, True):
                    answers = await asyncio.gather(
                        *(
                            bob.patch("/preferences", json={"push": value})
                            for _ in range(8)
                        )
                    )
                    assert {a.status_code for a in answers} == {200}
                    assert {a.json()["push"] for a in answers} == {value}
    assert heard == ["preferences"] * 2
    changed = logged_changes(caplog)
    assert changed == [
        "preferences changed: push off; 0 waiting notifications skipped",
        "preferences changed: push on; 0 waiting notifications skipped",
    ]
