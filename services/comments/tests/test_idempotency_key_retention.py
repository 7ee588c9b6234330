"""Idempotency-Keys are remembered for the configured hours, then forgotten."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from comments.app import create_app
from comments.keys import KeySweeper, forget_batches, forget_old_keys
from contracts.auth import issue_token
from contracts.db import create_pool
from contracts.settings import Settings
from tests.support.data import Demo, seed_demo
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

AGE = "UPDATE idempotency_keys SET created_at = now() - make_interval(hours => $2) "
AGE += "WHERE key = $1"


@pytest.fixture
async def demo(settings: Settings) -> Demo:
    return await seed_demo(settings.database_url)


async def test_a_retry_after_the_key_is_forgotten_is_a_new_comment(
    settings: Settings, demo: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("comments.keys.SWEEP_SECONDS", 0.2)
    token = issue_token(demo.bob, "bob", settings)
    comment = {"post_id": demo.post, "body": "said once"}
    db = await asyncpg.connect(settings.database_url)
    app = create_app(settings.model_copy(update={"idempotency_key_hours": 2}))
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://t",
                headers={"Authorization": f"Bearer {token}"},
            ) as client,
        ):

            async def post(key: str) -> httpx.Response:
                return await client.post(
                    "/comments", json=comment, headers={"Idempotency-Key": key}
                )

            first = await post("recent")
            stale = await post("stale")
            # One hour old: inside the two hours, remembered.
            await db.execute(AGE, "recent", 1)
            await db.execute(AGE, "stale", 3)
            await eventually(
                lambda: _gone(db, "stale"), what="the stale key forgotten", timeout=10
            )
            replayed = await post("recent")
            again = await post("stale")
        count = await db.fetchval(
            "SELECT count(*) FROM comments WHERE body = 'said once'"
        )
    finally:
        await db.close()

    assert replayed.status_code == 201
    assert replayed.json() == first.json()
    assert again.status_code == 201
    assert again.json()["id"] != stale.json()["id"]
    assert count == 3


async def test_a_sweep_deletes_only_keys_older_than_the_hours_in_batches(
    settings: Settings, demo: Demo
) -> None:
    db = await asyncpg.connect(settings.database_url)
    pool = await create_pool(settings)
    try:
        await db.execute(
            "INSERT INTO idempotency_keys "
            "(user_id, key, request_hash, status_code, response, created_at) "
            "SELECT $1, 'k' || n, 'h', 201, '{}', "
            "now() - make_interval(hours => n % 4, mins => 30) "
            "FROM generate_series(1, 250) AS n",
            demo.bob,
        )
        # Ages 0.5, 1.5, 2.5 and 3.5 hours; those past 2 hours go.
        forgotten = await forget_old_keys(pool, hours=2, batch=40)
        left = await db.fetchval(
            "SELECT count(*) FROM idempotency_keys "
            "WHERE created_at < now() - interval '2 hours'"
        )
        kept = await db.fetchval("SELECT count(*) FROM idempotency_keys")
        again = await forget_old_keys(pool, hours=2, batch=40)
    finally:
        await pool.close()
        await db.close()

    assert forgotten == 125
    assert left == 0
    assert kept == 125
    assert again == 0


async def test_a_sweep_that_cannot_reach_the_database_tries_again(
    settings: Settings, demo: Demo, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await create_pool(settings)
    sweeper = KeySweeper(pool, hours=1, interval=0.1)
    await pool.close()
    sweeper.start()
    try:
        await eventually(
            lambda: _logged_twice(caplog), what="two failed sweeps", timeout=10
        )
    finally:
        await sweeper.stop()

    failed = [r for r in caplog.records if _failed(r)]
    assert all("trying again in 0.1 s" in r.getMessage() for r in failed)


async def test_a_sweep_cut_short_by_a_stop_logs_what_it_forgot(
    settings: Settings,
    demo: Demo,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def one_batch_then_stuck(
        pool: asyncpg.Pool, hours: int, batch: int = 0
    ) -> AsyncIterator[int]:
        async for deleted in forget_batches(pool, hours, batch=40):
            yield deleted
            await asyncio.Event().wait()  # the next statement never ends

    monkeypatch.setattr("comments.keys.forget_batches", one_batch_then_stuck)
    caplog.set_level(logging.INFO, logger="comments.keys")
    db = await asyncpg.connect(settings.database_url)
    pool = await create_pool(settings)
    sweeper = KeySweeper(pool, hours=1)
    try:
        await db.execute(
            "INSERT INTO idempotency_keys "
            "(user_id, key, request_hash, status_code, response, created_at) "
            "SELECT $1, 'k' || n, 'h', 201, '{}', now() - interval '2 hours' "
            "FROM generate_series(1, 100) AS n",
            demo.bob,
        )
        sweeper.start()
        await eventually(
            lambda: _count_is(db, 60), what="the first batch forgotten", timeout=10
        )
        await sweeper.stop()
    finally:
        await pool.close()
        await db.close()

    stopped = [r for r in caplog.records if _action(r) == "idempotency.sweep_stopped"]
    assert [r.count for r in stopped] == [40]
    assert "after forgetting 40" in stopped[0].getMessage()


async def _count_is(db: asyncpg.Connection, expected: int) -> bool:
    return await db.fetchval("SELECT count(*) FROM idempotency_keys") == expected


def _action(record: object) -> str | None:
    return getattr(record, "action", None)


async def _gone(db: asyncpg.Connection, key: str) -> bool:
    return not await db.fetchval(
        "SELECT EXISTS (SELECT FROM idempotency_keys WHERE key = $1)", key
    )


async def _logged_twice(caplog: pytest.LogCaptureFixture) -> bool:
    return sum(1 for r in caplog.records if _failed(r)) >= 2


def _failed(record: object) -> bool:
    return _action(record) == "idempotency.sweep_failed"


async def test_a_retry_whose_key_is_forgotten_as_it_comes_is_a_new_comment(
    settings: Settings, demo: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = issue_token(demo.bob, "bob", settings)
    comment = {"post_id": demo.post, "body": "said at the edge"}
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://t",
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "edge"},
        ) as client,
    ):
        first = await client.post("/comments", json=comment)
        # Another replica's sweep deletes the key between the statement that
        # finds it taken and the one that reads its response.
        monkeypatch.setattr(
            "comments.repository.STORED_RESPONSE",
            "WITH gone AS (DELETE FROM idempotency_keys "
            "WHERE user_id = $1 AND key = $2 RETURNING *) "
            "SELECT request_hash, status_code, response FROM gone WHERE false",
        )
        again = await client.post("/comments", json=comment)

    db = await asyncpg.connect(settings.database_url)
    try:
        count = await db.fetchval(
            "SELECT count(*) FROM comments WHERE body = 'said at the edge'"
        )
        kept = await db.fetchval(
            "SELECT response->>'id' FROM idempotency_keys WHERE key = 'edge'"
        )
    finally:
        await db.close()
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] != first.json()["id"]
    assert count == 2
    assert kept == str(again.json()["id"])
