"""The comments API against the real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import httpx
import pytest

from comments.app import create_app
from contracts import topology
from contracts.auth import issue_token
from contracts.mentions import MAX_MENTIONS
from contracts.messages import CommentCreated, decode
from contracts.settings import Settings
from tests.support.data import Demo, seed_demo
from tests.support.ids import other_spellings
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def demo(settings: Settings) -> Demo:
    return await seed_demo(settings.database_url)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


def auth(settings: Settings, user_id: int, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(user_id, name, settings)}"}


async def counts(settings: Settings) -> tuple[int, int]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        comments = await conn.fetchval("SELECT count(*) FROM comments")
        outbox = await conn.fetchval("SELECT count(*) FROM outbox")
    finally:
        await conn.close()
    return comments, outbox


async def test_thread_lists_comments_oldest_first(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    for name, user in (("bob", demo.bob), ("carol", demo.carol)):
        resp = await client.post(
            "/comments",
            json={"post_id": demo.post, "body": f"first from {name}"},
            headers=auth(settings, user, name),
        )
        assert resp.status_code == 201

    posts = (await client.get("/posts")).json()
    thread = (await client.get(f"/posts/{demo.post}")).json()

    assert posts[0]["id"] == demo.post and posts[0]["comment_count"] == 2
    assert posts[0]["author"]["username"] == "alice"
    assert [c["author"]["username"] for c in thread["comments"]] == ["bob", "carol"]
    assert thread["comments"][1]["author"]["display_name"] == "Zoë 🚀 Carol"


@pytest.mark.parametrize("key", [None, "b2c6a0de-4a0f-4f7e-9d6f-0a1b2c3d4e5f"])
async def test_a_comment_is_published_as_comment_created_with_or_without_a_key(
    client: httpx.AsyncClient, settings: Settings, demo: Demo, key: str | None
) -> None:
    text = 'quotes " and \\ back\\slashes,\ttabs\nlines, \u2028, é, 👩‍💻 @alice'
    headers = auth(settings, demo.bob, "bob")
    if key is not None:
        headers["Idempotency-Key"] = key
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.DISPATCHER_QUEUE, passive=True)

        resp = await client.post(
            "/comments", json={"post_id": demo.post, "body": text}, headers=headers
        )
        assert resp.status_code == 201
        body = resp.json()

        message = await eventually(
            lambda: queue.get(fail=False), what="CommentCreated on the queue"
        )
        event = decode(CommentCreated, message.body)
        await message.ack()

    assert body["body"] == text
    assert event.body == text
    assert (event.comment_id, str(event.event_id)) == (body["id"], body["event_id"])
    assert (event.post_id, event.author_id) == (demo.post, demo.bob)
    assert event.schema_version == "1.0"
    assert message.message_id == body["event_id"]

    async def deleted() -> bool:
        return await counts(settings) == (1, 0)

    await eventually(deleted, what="the relay deleting what it published")


@pytest.mark.parametrize("incoming", [True, False], ids=["traced", "untraced"])
async def test_comment_created_carries_the_request_trace_on(
    client: httpx.AsyncClient, settings: Settings, demo: Demo, incoming: bool
) -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    traceparent = f"00-{trace_id}-b7ad6b7169203331-01"
    headers = auth(settings, demo.bob, "bob")
    if incoming:
        headers["traceparent"] = traceparent
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.DISPATCHER_QUEUE, passive=True)

        resp = await client.post(
            "/comments", json={"post_id": demo.post, "body": "hi"}, headers=headers
        )
        assert resp.status_code == 201
        message = await eventually(
            lambda: queue.get(fail=False), what="CommentCreated on the queue"
        )
        await message.ack()

    carried = str((message.headers or {})["traceparent"])
    if incoming:
        # The caller's trace goes on as it came, to the dispatcher and beyond.
        assert carried == traceparent
    else:
        # A trace of its own, not sampled, so that every service logs its id.
        version, started, span_id, flags = carried.split("-")
        assert (version, flags) == ("00", "00")
        assert int(started, 16) != 0 and int(span_id, 16) != 0


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"post_id": 1}, "body"),
        ({"body": "hi"}, "post_id"),
        ({"post_id": 1, "body": ""}, "body"),
        ({"post_id": 1, "body": "   \n "}, "body"),
        ({"post_id": 1, "body": "x" * 5001}, "body"),
        ({"post_id": "1", "body": "hi"}, "post_id"),
        ({"post_id": 1, "body": 5}, "body"),
        ({"post_id": 1, "body": "hi", "author_id": 3}, "author_id"),
        ({"post_id": 0, "body": "hi"}, "post_id"),
    ],
)
async def test_invalid_comment_is_422_naming_the_field_and_stores_nothing(
    client: httpx.AsyncClient,
    settings: Settings,
    demo: Demo,
    payload: dict[str, object],
    field: str,
) -> None:
    resp = await client.post(
        "/comments", json=payload, headers=auth(settings, demo.bob, "bob")
    )

    assert resp.status_code == 422
    error = resp.json()
    assert error["error"] == "invalid_request"
    assert field in [f["field"] for f in error["fields"]]
    assert field in error["detail"]
    assert await counts(settings) == (0, 0)


INVISIBLE_BODIES = [
    "\u200b",
    "\u200b\u200c\u200d",
    " \u2060\n\ufeff\t",
    "\u00ad\u061c\u200e\u202e\u2066",
    "\U000e0001\U000e0041",
    "\u3164\u115f",
    "\u034f\ufe0f\U000e0100",
    "\x07\x1b",
    "\u2800\u2800",
    "\u0301",
    "\ufeff\u0301\u20dd",
    "\uffff",
    "\ue000",
    "\u0378",
]


async def test_comment_of_only_invisible_characters_is_refused(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    answers = [
        await client.post(
            "/comments",
            json={"post_id": demo.post, "body": body},
            headers=auth(settings, demo.bob, "bob"),
        )
        for body in INVISIBLE_BODIES
    ]

    for body, resp in zip(INVISIBLE_BODIES, answers, strict=True):
        assert resp.status_code == 422, ascii(body)
        assert resp.json()["fields"] == [
            {"field": "body", "message": "must contain text"}
        ]
    assert await counts(settings) == (0, 0)


async def test_visible_text_with_joiners_and_format_characters_is_kept_unchanged(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    bodies = [
        "\U0001f469\u200d\U0001f4bb",  # woman technologist, a ZWJ sequence
        "\u2764\ufe0f",  # heart with its emoji presentation selector
        "\u200bx\u200b",
        "co\u00adoperate",
        "\u05e9\u05dc\u05d5\u05dd \u200f!",
        "e\u0301",  # a letter with a combining accent
        "?",
        "7",
    ]

    created = [
        await client.post(
            "/comments",
            json={"post_id": demo.post, "body": body},
            headers=auth(settings, demo.bob, "bob"),
        )
        for body in bodies
    ]
    thread = (await client.get(f"/posts/{demo.post}")).json()

    assert [r.status_code for r in created] == [201] * len(bodies)
    assert [r.json()["body"] for r in created] == bodies
    assert [c["body"] for c in thread["comments"]] == bodies


async def test_unknown_post_is_404_and_stores_nothing(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    resp = await client.post(
        "/comments",
        json={"post_id": 999999, "body": "hi"},
        headers=auth(settings, demo.bob, "bob"),
    )
    missing_thread = await client.get("/posts/999999")

    assert resp.status_code == 404
    assert "post 999999" in resp.json()["detail"]
    assert missing_thread.status_code == 404
    assert await counts(settings) == (0, 0)


@pytest.mark.parametrize("key", [None, "c1f0e9d8-7b6a-4c5d-8e9f-0a1b2c3d4e5f"])
async def test_a_token_for_a_user_not_in_the_database_is_401_and_stores_nothing(
    client: httpx.AsyncClient, settings: Settings, demo: Demo, key: str | None
) -> None:
    missing_user = demo.dave + 1000
    headers = auth(settings, missing_user, "ghost")
    if key is not None:
        headers["Idempotency-Key"] = key

    on_a_post = await client.post(
        "/comments", json={"post_id": demo.post, "body": "hi"}, headers=headers
    )
    on_no_post = await client.post(
        "/comments", json={"post_id": 999999, "body": "hi"}, headers=headers
    )
    directory = await client.get("/users", headers=headers)

    for resp in (on_a_post, on_no_post, directory):
        assert resp.status_code == 401, resp.text
        assert resp.headers["www-authenticate"] == "Bearer"
        assert resp.json() == {
            "error": "unauthorized",
            "detail": f"the token names user {missing_user}, who does not exist",
        }
    assert await counts(settings) == (0, 0)
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == 0
    finally:
        await conn.close()


async def test_a_refused_comment_leaves_its_idempotency_key_free(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    headers = {**auth(settings, demo.bob, "bob"), "Idempotency-Key": "k-404"}

    refused = await client.post(
        "/comments", json={"post_id": 999999, "body": "hi"}, headers=headers
    )
    stored = await client.post(
        "/comments", json={"post_id": demo.post, "body": "hi"}, headers=headers
    )

    assert refused.status_code == 404
    assert refused.json()["detail"] == "post 999999 does not exist"
    assert stored.status_code == 201, stored.text
    assert "Idempotent-Replayed" not in stored.headers
    assert (await counts(settings))[0] == 1


async def test_a_comment_is_published_by_its_own_process_without_notify_or_sweep(
    settings: Settings, demo: Demo
) -> None:
    slow_sweep = settings.model_copy(update={"outbox_sweep_seconds": 3600})
    db = await asyncpg.connect(settings.database_url)
    try:
        await db.execute("ALTER TABLE outbox DISABLE TRIGGER outbox_wake")
    finally:
        await db.close()
    app = create_app(slow_sweep)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection, app.router.lifespan_context(app):
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.DISPATCHER_QUEUE, passive=True)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            resp = await c.post(
                "/comments",
                json={"post_id": demo.post, "body": "no NOTIFY needed"},
                headers=auth(settings, demo.bob, "bob"),
            )

        message = await eventually(
            lambda: queue.get(fail=False), what="CommentCreated", timeout=10
        )
        await message.ack()

    assert resp.status_code == 201
    assert decode(CommentCreated, message.body).comment_id == resp.json()["id"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Basic Ym9iOmJvYg=="},
    ],
)
async def test_missing_or_bad_token_is_401_and_stores_nothing(
    client: httpx.AsyncClient, settings: Settings, demo: Demo, headers: dict[str, str]
) -> None:
    resp = await client.post(
        "/comments", json={"post_id": demo.post, "body": "hi"}, headers=headers
    )

    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert await counts(settings) == (0, 0)


async def test_expired_token_is_401(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    token = issue_token(demo.bob, "bob", settings, ttl_seconds=-1)

    resp = await client.post(
        "/comments",
        json={"post_id": demo.post, "body": "hi"},
        headers={"Authorization": f"Bearer {token}"},
    )

    assert resp.status_code == 401
    assert resp.json()["detail"] == "token has expired"


TOO_BIG = 2**63


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"post_id": TOO_BIG, "body": "hi"}, "post_id"),
        ({"post_id": 1, "body": "nul \x00 inside"}, "body"),
    ],
)
async def test_values_the_database_cannot_hold_are_422(
    client: httpx.AsyncClient,
    settings: Settings,
    demo: Demo,
    payload: dict[str, object],
    field: str,
) -> None:
    resp = await client.post(
        "/comments", json=payload, headers=auth(settings, demo.bob, "bob")
    )
    thread = await client.get(f"/posts/{TOO_BIG}")

    assert resp.status_code == 422, resp.text
    assert field in [f["field"] for f in resp.json()["fields"]]
    assert thread.status_code == 422
    assert thread.json()["fields"][0]["field"] == "post_id"
    assert await counts(settings) == (0, 0)


async def test_a_token_naming_an_impossible_user_id_is_401(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    token = issue_token(10**23, "ghost", settings)

    resp = await client.post(
        "/comments",
        json={"post_id": demo.post, "body": "hi"},
        headers={"Authorization": f"Bearer {token}"},
    )

    assert resp.status_code == 401


async def test_oversized_bodies_are_refused_before_being_read(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    big = b'{"post_id": 1, "body": "' + b"x" * (70 * 1024) + b'"}'

    async def chunks():
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    declared = await client.post(
        "/comments",
        content=big,
        headers={**auth(settings, demo.bob, "bob"), "Content-Type": "application/json"},
    )
    chunked = await client.post(
        "/comments",
        content=chunks(),
        headers={**auth(settings, demo.bob, "bob"), "Content-Type": "application/json"},
    )

    for resp in (declared, chunked):
        assert resp.status_code == 413
        assert resp.json()["error"] == "too_large"
    assert await counts(settings) == (0, 0)


async def test_a_request_with_thousands_of_mistakes_gets_a_short_answer(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    payload = {"post_id": demo.post, "body": "hi"} | {f"k{n}": n for n in range(3000)}

    resp = await client.post(
        "/comments", json=payload, headers=auth(settings, demo.bob, "bob")
    )

    assert resp.status_code == 422
    assert len(resp.json()["fields"]) == 21
    assert resp.json()["fields"][-1]["message"] == "and 2980 more problems"


async def test_every_error_is_json(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    missing = await client.get("/no/such/route")
    wrong_method = await client.delete("/posts")
    not_json = await client.post(
        "/comments",
        content=b"{oops",
        headers={**auth(settings, demo.bob, "bob"), "Content-Type": "application/json"},
    )

    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    assert (wrong_method.status_code, wrong_method.json()["error"]) == (
        405,
        "method_not_allowed",
    )
    assert not_json.status_code == 422
    assert not_json.json()["error"] == "invalid_request"


async def test_a_body_that_is_not_json_is_named_as_the_whole_body(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    resp = await client.post(
        "/comments",
        content=b"{oops",
        headers={**auth(settings, demo.bob, "bob"), "Content-Type": "application/json"},
    )

    assert resp.status_code == 422
    assert resp.json()["fields"][0]["field"] == "(request body)"


async def test_the_user_directory_needs_a_token_outside_development(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    anonymous = await client.get("/users")
    signed_in = await client.get("/users", headers=auth(settings, demo.bob, "bob"))

    assert anonymous.status_code == 401
    assert [u["username"] for u in signed_in.json()] == [
        "alice",
        "bob",
        "carol",
        "dave",
    ]


async def test_concurrent_requests_with_one_idempotency_key_store_one_comment(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    headers = {**auth(settings, demo.bob, "bob"), "Idempotency-Key": "k-123"}
    payload = {"post_id": demo.post, "body": "said once"}

    responses = await asyncio.gather(
        *(client.post("/comments", json=payload, headers=headers) for _ in range(10))
    )

    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 9
    assert (await counts(settings))[0] == 1


async def test_a_replayed_comment_answers_byte_for_byte_as_the_first_did(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    headers = {**auth(settings, demo.bob, "bob"), "Idempotency-Key": "k-same"}
    payload = {"post_id": demo.post, "body": "said once"}

    first = await client.post("/comments", json=payload, headers=headers)
    again = await client.post("/comments", json=payload, headers=headers)

    assert first.status_code == again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content


async def test_a_post_id_not_written_in_canonical_decimal_is_refused_naming_it(
    client: httpx.AsyncClient, demo: Demo
) -> None:
    answers = [await client.get(f"/posts/{s}") for s in other_spellings(demo.post)]
    canonical = await client.get(f"/posts/{demo.post}")

    for spelling, resp in zip(other_spellings(demo.post), answers, strict=True):
        assert resp.status_code == 422, (spelling, resp.text)
        assert resp.json()["error"] == "invalid_request"
        assert [f["field"] for f in resp.json()["fields"]] == ["post_id"], spelling
    assert canonical.status_code == 200


PAGE = "https://app.example"


@pytest.fixture
async def browser(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A page on an allowed origin calling the API, as its fetch() would."""
    app = create_app(settings.model_copy(update={"cors_origins": PAGE}))
    async with app.router.lifespan_context(app):
        # A crash is answered, and still raised to the server; the test wants the
        # answer.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", headers={"Origin": PAGE}
        ) as c:
            yield c


def cors(resp: httpx.Response) -> dict[str, str]:
    return {
        name: value
        for name, value in resp.headers.items()
        if name.startswith("access-control-") or name == "vary"
    }


async def test_every_error_carries_the_cors_headers_of_a_normal_answer(
    browser: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    headers = {**auth(settings, demo.bob, "bob"), "Content-Type": "application/json"}
    big = b'{"post_id": 1, "body": "' + b"x" * (70 * 1024) + b'"}'

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    errors = {
        "too large": await browser.post("/comments", content=big, headers=headers),
        "too large, chunked": await browser.post(
            "/comments", content=chunks(), headers=headers
        ),
        "repeated key": await browser.post(
            "/comments", content=b'{"post_id": 1, "post_id": 2}', headers=headers
        ),
        "invalid": await browser.post("/comments", json={}, headers=headers),
        "no token": await browser.post("/comments", json={"post_id": 1}),
        "unknown post": await browser.get("/posts/999999"),
        "loose id": await browser.get(f"/posts/0{demo.post}"),
    }
    normal = await browser.get(f"/posts/{demo.post}")
    conn = await asyncpg.connect(settings.database_url)
    try:
        # A value the service cannot answer with: a failure of its own.
        await conn.execute(
            "ALTER TABLE posts ALTER COLUMN created_at DROP NOT NULL;"
            "UPDATE posts SET created_at = NULL"
        )
        errors["crash"] = await browser.get("/posts")
        await conn.execute("ALTER TABLE posts RENAME TO posts_elsewhere")
        errors["table gone"] = await browser.get("/posts")
    finally:
        await conn.close()

    assert normal.status_code == 200
    assert cors(normal)["access-control-allow-origin"] == PAGE
    statuses = {name: resp.status_code for name, resp in errors.items()}
    assert statuses == {
        "too large": 413,
        "too large, chunked": 413,
        "repeated key": 422,
        "invalid": 422,
        "no token": 401,
        "unknown post": 404,
        "loose id": 422,
        "crash": 500,
        "table gone": 503,
    }
    for name, resp in errors.items():
        assert cors(resp) == cors(normal), name
        assert resp.json()["error"], name
    assert await counts(settings) == (0, 0)


async def test_a_page_is_let_in_though_its_origin_was_configured_unlike_a_browser() -> (
    None
):
    # Browsers send the origin in lower case, without a trailing slash.
    app = create_app(Settings(env="test", cors_origins="HTTPS://App.Example/"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        preflight = await c.options(
            "/comments",
            headers={
                "Origin": PAGE,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )

    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == PAGE


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b'{"post_id": 1, "body": "a\xff"}',
            "is not valid UTF-8: byte 0xff at offset 25",
        ),
        (
            b'{"post_id": 1,\n "body": "a",}',
            "is not valid JSON: syntax error at line 2 column 14: "
            "Expecting property name enclosed in double quotes",
        ),
        (b"null", "must be a JSON object, not null"),
        (b"[]", "must be a JSON object, not an array"),
        (b"", "must be a JSON object; the request has no body"),
    ],
    ids=["not-utf8", "not-json", "null", "array", "empty"],
)
async def test_a_comment_body_that_is_no_json_object_is_refused_saying_why(
    client: httpx.AsyncClient,
    settings: Settings,
    demo: Demo,
    content: bytes,
    message: str,
) -> None:
    resp = await client.post(
        "/comments",
        content=content,
        headers={**JSON, **auth(settings, demo.bob, "bob")},
    )

    assert resp.status_code == 422, resp.text
    assert resp.json() == {
        "error": "invalid_request",
        "detail": f"(request body): {message}",
        "fields": [{"field": "(request body)", "message": message}],
    }
    assert await counts(settings) == (0, 0)


@pytest.mark.parametrize(
    ("content_type", "named"),
    [
        ("text/plain", "Content-Type 'text/plain'"),
        ("application/x-www-form-urlencoded", "Content-Type 'application/x-www"),
        (None, "no Content-Type"),
    ],
    ids=["text", "form", "none"],
)
async def test_a_comment_not_sent_as_json_is_415_naming_the_type_it_needs(
    client: httpx.AsyncClient,
    settings: Settings,
    demo: Demo,
    content_type: str | None,
    named: str,
) -> None:
    headers = auth(settings, demo.bob, "bob")
    if content_type is not None:
        headers["Content-Type"] = content_type
    content = json.dumps({"post_id": demo.post, "body": "hi"}).encode()

    resp = await client.post("/comments", content=content, headers=headers)

    assert resp.status_code == 415, resp.text
    assert resp.json()["error"] == "unsupported_media_type"
    assert resp.json()["detail"].startswith(
        "the body must be sent as application/json (or a +json type); "
        f"the request gave {named}"
    )
    assert await counts(settings) == (0, 0)


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "application/vnd.api+json"]
)
async def test_a_comment_sent_as_any_json_type_is_stored(
    client: httpx.AsyncClient, settings: Settings, demo: Demo, content_type: str
) -> None:
    content = json.dumps({"post_id": demo.post, "body": "hi"}).encode()

    resp = await client.post(
        "/comments",
        content=content,
        headers={"Content-Type": content_type, **auth(settings, demo.bob, "bob")},
    )

    assert resp.status_code == 201, resp.text
    assert await counts(settings) == (1, 1)


# Bodies FastAPI cannot parse: it reads them before it looks at the token.
UNPARSABLE = [
    b'{"post_id": 1, "body": "a\xff"}',
    b'{"post_id": 1,\n "body": "a",}',
    b"[" * 50_000,
]
UNPARSABLE_IDS = ["not-utf8", "not-json", "too-deep"]


@pytest.mark.parametrize("content", UNPARSABLE, ids=UNPARSABLE_IDS)
@pytest.mark.parametrize(
    ("authorization", "detail"),
    [
        (None, "missing bearer token"),
        ("Bearer not-a-token", "token is invalid"),
        ("Basic Ym9iOmJvYg==", "missing bearer token"),
    ],
    ids=["none", "forged", "basic"],
)
async def test_a_bad_token_is_401_before_an_unparsable_body_is_judged(
    client: httpx.AsyncClient,
    settings: Settings,
    demo: Demo,
    content: bytes,
    authorization: str | None,
    detail: str,
) -> None:
    headers = dict(JSON)
    if authorization is not None:
        headers["Authorization"] = authorization

    resp = await client.post("/comments", content=content, headers=headers)

    assert resp.status_code == 401, resp.text
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert resp.json() == {"error": "unauthorized", "detail": detail}
    assert await counts(settings) == (0, 0)


async def test_an_expired_token_is_401_before_an_unparsable_body_is_judged(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    token = issue_token(demo.bob, "bob", settings, ttl_seconds=-1)

    resp = await client.post(
        "/comments",
        content=b"{oops",
        headers={**JSON, "Authorization": f"Bearer {token}"},
    )

    assert resp.status_code == 401, resp.text
    assert resp.json()["detail"] == "token has expired"


@pytest.mark.parametrize("content", UNPARSABLE, ids=UNPARSABLE_IDS)
async def test_a_route_that_takes_no_token_still_refuses_an_unparsable_body(
    settings: Settings, demo: Demo, content: bytes
) -> None:
    # The token route exists only in development.
    app = create_app(settings.model_copy(update={"env": "development"}))
    transport = httpx.ASGITransport(app=app)

    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        resp = await client.post("/dev/token", content=content, headers=JSON)

    assert resp.status_code == 422, resp.text
    assert resp.json()["fields"][0]["field"] == "(request body)"


@pytest.mark.parametrize(
    "content",
    [
        '{{"post_id": {post}, "body": "who wrote this?"}}',
        '{{"post_id": {post}, "body": "not closed"',
        '{{"post_id": {post}, "post_id": {post}, "body": "twice"}}',
    ],
    ids=["good body", "unparsable body", "body repeating a key"],
)
async def test_a_comment_sent_with_two_authorization_headers_is_refused_naming_it(
    client: httpx.AsyncClient, settings: Settings, demo: Demo, content: str
) -> None:
    bob = auth(settings, demo.bob, "bob")["Authorization"]
    alice = auth(settings, demo.alice, "alice")["Authorization"]

    resp = await client.post(
        "/comments",
        content=content.format(post=demo.post),
        headers=[
            ("Authorization", bob),
            ("Authorization", alice),
            ("Content-Type", "application/json"),
        ],
    )

    assert resp.status_code == 422, resp.text
    assert resp.json()["fields"] == [
        {"field": "authorization", "message": "given more than once; send one"}
    ]
    assert bob.removeprefix("Bearer ") not in resp.text
    assert await counts(settings) == (0, 0)


async def test_a_comment_mentioning_more_people_than_allowed_is_refused(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    many = " ".join(f"@user{n}" for n in range(MAX_MENTIONS + 1))
    # The same person named twice counts once; an address is no mention.
    enough = " ".join(
        [*(f"@user{n}" for n in range(MAX_MENTIONS)), "@user0", "x@example.com"]
    )

    refused = await client.post(
        "/comments",
        json={"post_id": demo.post, "body": many},
        headers=auth(settings, demo.bob, "bob"),
    )
    assert refused.status_code == 422
    assert refused.json()["fields"] == [
        {
            "field": "body",
            "message": f"mentions {MAX_MENTIONS + 1} people; a comment may "
            f"mention at most {MAX_MENTIONS}",
        }
    ]
    assert await counts(settings) == (0, 0)

    taken = await client.post(
        "/comments",
        json={"post_id": demo.post, "body": enough},
        headers=auth(settings, demo.bob, "bob"),
    )
    assert taken.status_code == 201
