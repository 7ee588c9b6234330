"""How many comments one user may post a minute (NOTIFLOW_COMMENTS_PER_MINUTE)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import asyncpg
import httpx
import pytest

from comments.app import create_app
from contracts.settings import Settings
from tests.integration.conftest import calling
from tests.support.data import Demo

pytestmark = pytest.mark.integration

Caller = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def as_user(settings: Settings, demo: Demo) -> Caller:
    """A client of a comments service allowing ``per_minute`` comments a minute,
    calling as the demo user ``name``."""

    @asynccontextmanager
    async def start(per_minute: int, name: str) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(
            settings.model_copy(
                update={"comments_per_minute": per_minute, "db_pool_max": 10}
            )
        )
        async with calling(app, settings, getattr(demo, name), name) as client:
            yield client

    return start


async def _stored_by(db: asyncpg.Connection, user: int) -> int:
    return await db.fetchval("SELECT count(*) FROM comments WHERE author_id = $1", user)


async def _a_minute_passes(db: asyncpg.Connection) -> None:
    await db.execute(
        "UPDATE comment_pace SET paced_until = paced_until - interval '1 minute'"
    )


async def test_a_user_past_the_minutes_comments_gets_429_and_nothing_is_stored(
    as_user: Caller, demo: Demo, db: asyncpg.Connection
) -> None:
    body = {"post_id": demo.post, "body": "hello"}
    async with as_user(3, "carol") as carol, as_user(3, "dave") as dave:
        allowed = [await carol.post("/comments", json=body) for _ in range(3)]
        outbox_before = await db.fetchval("SELECT count(*) FROM outbox")
        refused = await carol.post("/comments", json=body)
        keyed = await carol.post(
            "/comments", json=body, headers={"Idempotency-Key": str(uuid.uuid4())}
        )
        outbox_after = await db.fetchval("SELECT count(*) FROM outbox")
        other_user = await dave.post("/comments", json=body)

    assert [r.status_code for r in allowed] == [201, 201, 201]
    for answer in (refused, keyed):
        assert answer.status_code == 429, answer.text
        assert answer.json()["error"] == "too_many_comments"
        assert "3 comments a minute" in answer.json()["detail"]
        # Three taken at once: the first comes back one interval (20 s) on.
        assert 1 <= int(answer.headers["Retry-After"]) <= 20
    assert outbox_after <= outbox_before
    assert await _stored_by(db, demo.carol) == 3
    assert other_user.status_code == 201


async def test_an_allowance_comes_back_as_time_passes(
    as_user: Caller, demo: Demo, db: asyncpg.Connection
) -> None:
    body = {"post_id": demo.post, "body": "hello"}
    async with as_user(2, "carol") as carol:
        spent = [
            (await carol.post("/comments", json=body)).status_code for _ in range(3)
        ]
        await _a_minute_passes(db)
        back = [
            (await carol.post("/comments", json=body)).status_code for _ in range(3)
        ]

    assert spent == [201, 201, 429]
    assert back == [201, 201, 429]
    assert await _stored_by(db, demo.carol) == 4


async def test_requests_at_once_never_take_more_than_the_minutes_comments(
    as_user: Caller, demo: Demo, db: asyncpg.Connection
) -> None:
    body = {"post_id": demo.post, "body": "all at once"}
    async with as_user(5, "carol") as carol:
        answers = await asyncio.gather(
            *(carol.post("/comments", json=body) for _ in range(12)),
            *(
                carol.post(
                    "/comments",
                    json=body,
                    headers={"Idempotency-Key": str(uuid.uuid4())},
                )
                for _ in range(12)
            ),
        )

    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201] * 5 + [429] * 19
    assert await _stored_by(db, demo.carol) == 5
    # Five taken at once: the next comes back one interval (12 s) on, and every
    # refusal says so, though it waited for the writers before it.
    waits = {int(a.headers["Retry-After"]) for a in answers if a.status_code == 429}
    assert waits <= {11, 12}, waits


async def test_a_user_deleted_while_commenting_gets_401_not_500(
    settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    eve = await db.fetchval(
        "INSERT INTO users (username, email, display_name) "
        "VALUES ('eve', 'eve@example.com', 'Eve') RETURNING id"
    )
    app = create_app(settings.model_copy(update={"comments_per_minute": 30}))
    body = {"post_id": demo.post, "body": "going, going"}
    async with calling(app, settings, eve, "eve") as client:
        deleting = await asyncpg.connect(settings.database_url)
        try:
            # The deletion holds eve's row until it commits; the comments wait
            # on it, and find her gone.
            await deleting.execute("BEGIN")
            await deleting.execute("DELETE FROM users WHERE id = $1", eve)
            posting = [
                asyncio.create_task(client.post("/comments", json=body)),
                asyncio.create_task(
                    client.post(
                        "/comments",
                        json=body,
                        headers={"Idempotency-Key": str(uuid.uuid4())},
                    )
                ),
            ]
            await asyncio.sleep(0.5)
            await deleting.execute("COMMIT")
            answers = await asyncio.gather(*posting)
        finally:
            await deleting.close()

    assert [a.status_code for a in answers] == [401, 401], [a.text for a in answers]
    assert await _stored_by(db, eve) == 0


async def test_a_refused_keyed_request_leaves_its_key_free_for_the_retry(
    as_user: Caller, demo: Demo, db: asyncpg.Connection
) -> None:
    body = {"post_id": demo.post, "body": "retried later"}
    key = {"Idempotency-Key": str(uuid.uuid4())}
    async with as_user(1, "carol") as carol:
        first = await carol.post("/comments", json={**body, "body": "first"})
        refused = await carol.post("/comments", json=body, headers=key)
        await _a_minute_passes(db)
        retried = await carol.post("/comments", json=body, headers=key)
        replayed = await carol.post("/comments", json=body, headers=key)

    assert first.status_code == 201
    assert refused.status_code == 429
    assert retried.status_code == 201, retried.text
    # A replay answers the stored comment, and takes nothing of the allowance.
    assert replayed.status_code == 201
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.json()["id"] == retried.json()["id"]
    assert await _stored_by(db, demo.carol) == 2


async def test_a_comment_on_a_missing_post_takes_nothing_of_the_allowance(
    as_user: Caller, demo: Demo, db: asyncpg.Connection
) -> None:
    async with as_user(1, "carol") as carol:
        missing = [
            (await carol.post("/comments", json={"post_id": 999_999, "body": "x"}))
            for _ in range(3)
        ]
        stored = await carol.post("/comments", json={"post_id": demo.post, "body": "x"})

    assert {r.status_code for r in missing} == {404}
    assert stored.status_code == 201


async def test_no_limit_when_the_setting_is_zero(
    as_user: Caller, demo: Demo, db: asyncpg.Connection
) -> None:
    body = {"post_id": demo.post, "body": "unlimited"}
    async with as_user(0, "carol") as carol:
        answers = [await carol.post("/comments", json=body) for _ in range(40)]

    assert {a.status_code for a in answers} == {201}
    assert await _stored_by(db, demo.carol) == 40
    assert await db.fetchval("SELECT count(*) FROM comment_pace") == 0
