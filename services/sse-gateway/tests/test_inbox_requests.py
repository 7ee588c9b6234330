"""What the inbox routes take in a request body, on the real PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from contracts.auth import issue_token
from contracts.settings import Settings
from sse_gateway import inbox
from sse_gateway.app import GatewaySettings, create_app
from tests.sse import helpers
from tests.support.data import Demo, seed_demo
from tests.support.ids import other_spellings
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def demo(settings: Settings) -> Demo:
    return await seed_demo(settings.database_url)


@pytest.fixture
async def bob(settings: Settings, demo: Demo) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewaySettings(**settings.model_dump()))
    token = issue_token(demo.bob, "bob", settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://t",
            headers={"Authorization": f"Bearer {token}"},
        ) as client:
            yield client


# A body, how it is sent, and the answer: 422 naming the field, or 415 for a body
# that is not sent as JSON.
REFUSED = [
    (b"{oops", JSON, 422, "(request body)"),
    (b"   ", JSON, 422, "(request body)"),
    (b"[]", JSON, 422, "(request body)"),
    (b"null", JSON, 422, "(request body)"),
    (b'"all"', JSON, 422, "(request body)"),
    (b'{"before": 5}', JSON, 422, "before"),
    (b'{"before": 5, "before": 6}', JSON, 422, "before"),
    (b"{\xff}", JSON, 422, "(request body)"),
    (b"{}", {"Content-Type": "text/plain"}, 415, None),
    (b"everything", {}, 415, None),
]


async def test_read_all_with_any_other_body_is_refused_and_marks_nothing(
    bob: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    async with helpers.database(settings.database_url) as pg:
        for n in range(3):
            await helpers.add_and_deliver(pg, demo.bob, f"n{n}")

    answers = [
        await bob.post("/inbox/read-all", content=content, headers=headers)
        for content, headers, _, _ in REFUSED
    ]

    for (content, _, status, field), answer in zip(REFUSED, answers, strict=True):
        assert answer.status_code == status, (content, answer.text)
        if status == 415:
            assert answer.json()["error"] == "unsupported_media_type"
            assert "application/json" in answer.json()["detail"]
        else:
            assert answer.json()["error"] == "invalid_request"
            assert answer.json()["fields"][0]["field"] == field, content
    assert (await bob.get("/inbox/unread-count")).json() == {"unread": 3}


@pytest.mark.parametrize(
    "content",
    [b"{oops", b"   ", b"{\xff}", b"[" * 50_000],
    ids=["not-json", "blank", "not-utf8", "too-deep"],
)
@pytest.mark.parametrize(
    ("query", "authorization", "detail"),
    [
        ("", None, "missing bearer token"),
        ("", "Bearer forged", "token is invalid"),
        ("?token=forged", None, "token is invalid"),
    ],
    ids=["none", "forged", "forged-in-query"],
)
async def test_a_bad_token_is_401_before_an_unparsable_body_is_judged(
    settings: Settings,
    demo: Demo,
    content: bytes,
    query: str,
    authorization: str | None,
    detail: str,
) -> None:
    async with helpers.database(settings.database_url) as pg:
        await helpers.add_and_deliver(pg, demo.bob, "unread")
    app = create_app(GatewaySettings(**settings.model_dump()))
    headers = dict(JSON)
    if authorization is not None:
        headers["Authorization"] = authorization

    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client,
    ):
        answer = await client.post(
            f"/inbox/read-all{query}", content=content, headers=headers
        )

    assert answer.status_code == 401, answer.text
    assert answer.headers["www-authenticate"] == "Bearer"
    assert answer.json() == {"error": "unauthorized", "detail": detail}
    async with helpers.database(settings.database_url) as pg:
        assert await pg.fetchval(inbox.UNREAD, demo.bob) == 1


async def test_read_all_takes_no_body_or_an_empty_json_object(
    bob: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    async with helpers.database(settings.database_url) as pg:
        first = [await helpers.add_and_deliver(pg, demo.bob, f"a{n}") for n in range(2)]

    bare = await bob.post("/inbox/read-all")
    async with helpers.database(settings.database_url) as pg:
        second = await helpers.add_and_deliver(pg, demo.bob, "b")
    empty = await bob.post("/inbox/read-all", json={})
    again = await bob.post("/inbox/read-all", content=b"", headers=JSON)

    assert bare.status_code == 200 and sorted(bare.json()["marked"]) == sorted(first)
    assert empty.json() == {"marked": [second], "unread": 0}
    assert again.json() == {"marked": [], "unread": 0}


@pytest.mark.parametrize("action", ["read", "archive"])
async def test_changing_one_notification_with_a_body_is_refused_and_changes_nothing(
    bob: httpx.AsyncClient, settings: Settings, demo: Demo, action: str
) -> None:
    async with helpers.database(settings.database_url) as pg:
        mine = await helpers.add_and_deliver(pg, demo.bob, "mine")

    answers = [
        await bob.post(f"/inbox/{mine}/{action}", content=content, headers=headers)
        for content, headers, _, _ in REFUSED
    ]
    bare = await bob.post(f"/inbox/{mine}/{action}")

    for (content, _, status, _), answer in zip(REFUSED, answers, strict=True):
        assert answer.status_code == status, (content, answer.text)
    assert bare.status_code == 200
    assert bare.json()["unread"] == 0


async def test_marking_thousands_read_is_announced_in_parts_that_name_them_all(
    bob: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    heard: list[dict[str, object]] = []
    async with helpers.database(settings.database_url) as pg:
        ids = [await helpers.add(pg, demo.bob, f"n{n}") for n in range(2000)]
        await inbox.deliver_many(pg, ids)
        await pg.add_listener(
            inbox.NOTIFY_CHANNEL, lambda *args: heard.append(json.loads(args[-1]))
        )

        answer = await bob.post("/inbox/read-all")

        async def all_heard() -> bool:
            named = [n for m in heard if m.get("kind") == "read" for n in m["ids"]]
            return sorted(named) == sorted(ids)

        await eventually(all_heard, what="every id announced as read")

    assert answer.status_code == 200, answer.text
    assert answer.json()["unread"] == 0
    assert len(answer.json()["marked"]) == 2000
    parts = [m for m in heard if m.get("kind") == "read"]
    assert len(parts) > 1
    assert all(m["unread"] == 0 for m in parts)


@pytest.mark.parametrize("action", ["read", "archive"])
async def test_a_notification_id_not_written_in_canonical_decimal_changes_nothing(
    bob: httpx.AsyncClient, settings: Settings, demo: Demo, action: str
) -> None:
    async with helpers.database(settings.database_url) as pg:
        mine = await helpers.add_and_deliver(pg, demo.bob, "mine")

    answers = [
        await bob.post(f"/inbox/{spelling}/{action}")
        for spelling in other_spellings(mine)
    ]
    async with helpers.database(settings.database_url) as pg:
        untouched = await pg.fetchrow(
            "SELECT read_at, archived_at FROM notifications WHERE id = $1", mine
        )
    canonical = await bob.post(f"/inbox/{mine}/{action}")

    for spelling, answer in zip(other_spellings(mine), answers, strict=True):
        assert answer.status_code == 422, (spelling, answer.text)
        assert answer.json()["error"] == "invalid_request"
        fields = [f["field"] for f in answer.json()["fields"]]
        assert fields == ["notification_id"], spelling
    assert tuple(untouched) == (None, None)
    assert canonical.status_code == 200
    assert canonical.json()["unread"] == 0


PAGE = "https://app.example"


async def test_refusals_carry_the_cors_headers_of_a_normal_answer(
    settings: Settings, demo: Demo
) -> None:
    app = create_app(GatewaySettings(**{**settings.model_dump(), "cors_origins": PAGE}))
    token = issue_token(demo.bob, "bob", settings)
    headers = {"Authorization": f"Bearer {token}", "Origin": PAGE}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://t",
            headers=headers,
        ) as page:
            normal = await page.get("/inbox/unread-count")
            refused = [
                await page.post(
                    "/inbox/read-all",
                    content=b"{}" + b" " * settings.max_request_bytes,
                    headers=JSON,
                ),
                await page.post(
                    "/inbox/read-all", content=b'{"a": 1, "a": 2}', headers=JSON
                ),
                await page.post("/inbox/+1/read"),
                await page.post("/inbox/1/read", headers={"Authorization": ""}),
            ]

    assert normal.headers["access-control-allow-origin"] == PAGE
    assert [r.status_code for r in refused] == [413, 422, 422, 401]
    for answer in refused:
        assert answer.headers["access-control-allow-origin"] == PAGE
        assert answer.headers["vary"] == normal.headers["vary"]


@pytest.mark.parametrize("name", ["limit", "cursor"])
async def test_a_page_number_is_taken_only_in_plain_decimal(
    bob: httpx.AsyncClient, name: str
) -> None:
    answers = {
        spelling: await bob.get(f"/inbox?{name}={spelling}")
        for spelling in other_spellings(5)
    }
    plain = await bob.get(f"/inbox?{name}=5")

    for spelling, answer in answers.items():
        assert answer.status_code == 422, (spelling, answer.text)
        assert [f["field"] for f in answer.json()["fields"]] == [name], spelling
    assert plain.status_code == 200


async def test_every_route_takes_the_token_from_the_query_as_eventsource_sends_it(
    settings: Settings, demo: Demo
) -> None:
    app = create_app(GatewaySettings(**settings.model_dump()))
    token = issue_token(demo.bob, "bob", settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            unread = await client.get("/inbox/unread-count", params={"token": token})
            page = await client.get("/inbox", params={"token": token, "limit": 5})
            preferences = await client.get("/preferences", params={"token": token})
            anonymous = await client.get("/inbox/unread-count")

    assert unread.status_code == 200 and unread.json() == {"unread": 0}
    assert page.status_code == 200, page.text
    assert preferences.status_code == 200, preferences.text
    assert anonymous.status_code == 401


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("limit=5&limit=500", ["limit"]),
        ("limit=500&limit=5", ["limit"]),
        ("cursor=9&limit=2&cursor=3", ["cursor"]),
    ],
)
async def test_an_inbox_page_with_a_parameter_given_twice_is_refused_naming_it(
    bob: httpx.AsyncClient,
    settings: Settings,
    demo: Demo,
    query: str,
    named: list[str],
) -> None:
    async with helpers.database(settings.database_url) as pg:
        await helpers.add_and_deliver(pg, demo.bob, "one")

    answer = await bob.get(f"/inbox?{query}")
    once = await bob.get("/inbox?limit=5")

    assert answer.status_code == 422, answer.text
    assert [f["field"] for f in answer.json()["fields"]] == named
    assert answer.json()["fields"][0]["message"] == (
        "given more than once; send one value"
    )
    assert len(once.json()["items"]) == 1
