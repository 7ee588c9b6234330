"""The comments API against the real PostgreSQL and RabbitMQ."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import httpx
import pytest

from comments.app import create_app
from contracts import topology
from contracts.auth import issue_token
from contracts.messages import CommentCreated, decode
from contracts.settings import Settings
from tests.support.data import Demo, seed_demo
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


async def test_created_comment_is_published_as_comment_created(
    client: httpx.AsyncClient, settings: Settings, demo: Demo
) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.DISPATCHER_QUEUE, passive=True)

        resp = await client.post(
            "/comments",
            json={"post_id": demo.post, "body": "hello @alice"},
            headers=auth(settings, demo.bob, "bob"),
        )
        assert resp.status_code == 201
        body = resp.json()

        message = await eventually(
            lambda: queue.get(fail=False), what="CommentCreated on the queue"
        )
        event = decode(CommentCreated, message.body)
        await message.ack()

    assert event.comment_id == body["id"]
    assert str(event.event_id) == body["event_id"]
    assert (event.post_id, event.author_id, event.body) == (
        demo.post,
        demo.bob,
        "hello @alice",
    )
    assert await counts(settings) == (1, 0), "the relay deletes what it published"


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
