"""POST /comments: Idempotency-Key, and a database that goes away."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from comments.app import create_app
from contracts import topology
from contracts.settings import Settings
from tests.integration import helpers
from tests.integration.conftest import EmailSenderFactory, calling, through
from tests.integration.proxy import Proxy
from tests.support.data import Demo
from tests.support.smtp import SmtpServer
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(
    settings: Settings, demo: Demo, proxy: Proxy
) -> AsyncIterator[httpx.AsyncClient]:
    options = {
        **settings.model_dump(),
        "database_url": through(settings, proxy),
        "db_acquire_timeout": 0.5,
        "db_pool_min": 1,
        "db_pool_max": 5,
    }
    app = create_app(Settings(**options))
    async with calling(app, settings, demo.carol, "carol") as client:
        yield client


async def _counts(db: asyncpg.Connection) -> tuple[int, int]:
    comments = await db.fetchval("SELECT count(*) FROM comments")
    return comments, await db.fetchval("SELECT count(*) FROM outbox")


async def test_the_same_key_and_body_answer_the_first_response_once(
    api: httpx.AsyncClient, demo: Demo, db: asyncpg.Connection
) -> None:
    before = await _counts(db)
    body = {"post_id": demo.post, "body": "only once, please"}
    key = {"Idempotency-Key": str(uuid.uuid4())}

    # The relay may publish the outbox row at any moment; stop it from counting.
    await db.execute("ALTER TABLE outbox DISABLE TRIGGER outbox_wake")
    first = await api.post("/comments", json=body, headers=key)
    again = await api.post("/comments", json=body, headers=key)
    other = await api.post(
        "/comments", json={**body, "body": "something else"}, headers=key
    )

    assert first.status_code == 201, first.text
    assert again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 409
    assert other.json()["error"] == "conflict"
    assert "Idempotency-Key" in other.json()["detail"]
    comments = await db.fetchval("SELECT count(*) FROM comments")
    assert comments == before[0] + 1
    events = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE message_id = $1", first.json()["event_id"]
    )
    published = events == 1 or await _published_once(db, first.json()["event_id"])
    assert published


async def test_a_non_ascii_idempotency_key_is_refused_and_nothing_is_stored(
    api: httpx.AsyncClient, demo: Demo, db: asyncpg.Connection
) -> None:
    before = await _counts(db)
    # A header travels as bytes; the server would read these as Latin-1.
    key = {"Idempotency-Key": "clé-à-molette".encode()}

    resp = await api.post(
        "/comments", json={"post_id": demo.post, "body": "hi"}, headers=key
    )

    assert resp.status_code == 422, resp.text
    assert resp.json()["error"] == "invalid_request"
    assert resp.json()["fields"] == [
        {
            "field": "idempotency-key",
            "message": "must be printable ASCII, such as a UUID",
        }
    ]
    assert await _counts(db) == before
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0


async def _published_once(db: asyncpg.Connection, event_id: str) -> bool:
    # Already taken by the relay: then no second outbox row may exist either.
    return (
        await db.fetchval("SELECT count(*) FROM outbox WHERE message_id = $1", event_id)
        == 0
    )


async def test_no_database_connection_answers_503_quickly(
    api: httpx.AsyncClient, demo: Demo, proxy: Proxy, db: asyncpg.Connection
) -> None:
    before = await db.fetchval("SELECT count(*) FROM comments")
    await proxy.cut()

    started = time.monotonic()
    resp = await api.post("/comments", json={"post_id": demo.post, "body": "hi"})
    took = time.monotonic() - started

    assert resp.status_code == 503, resp.text
    assert resp.json()["error"] == "unavailable"
    assert resp.headers["Retry-After"] == "2"
    assert took < 3
    assert await db.fetchval("SELECT count(*) FROM comments") == before


async def test_a_connection_lost_during_the_request_answers_503(
    api: httpx.AsyncClient, demo: Demo, proxy: Proxy, db: asyncpg.Connection
) -> None:
    before = await db.fetchval("SELECT count(*) FROM comments")
    async with db.transaction():
        # The request blocks on the lock, then loses its connection.
        await db.execute("LOCK TABLE posts IN ACCESS EXCLUSIVE MODE")
        request = asyncio.create_task(
            api.post("/comments", json={"post_id": demo.post, "body": "hi"})
        )

        async def waiting() -> bool:
            return bool(
                await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            )

        await eventually(waiting, what="request waiting on the lock")
        await proxy.cut()
        resp = await asyncio.wait_for(request, 10)

    assert resp.status_code == 503, resp.text
    assert await db.fetchval("SELECT count(*) FROM comments") == before


async def test_a_consumer_keeps_its_message_while_the_database_is_away(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    proxy: Proxy,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    note = await helpers.email_row(db, demo.bob, "bob@example.com")
    queue = topology.delivery_queue("email")

    # A step that hangs fails here, its traceback naming the await it hung on,
    # well before the suite's own timeout.
    async with asyncio.timeout(90), email_sender(database_url=through(settings, proxy)):
        await proxy.cut()
        await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])
        await asyncio.sleep(2)  # several backoff rounds while the database is away
        held = await helpers.depths(settings.amqp_url, queue)
        row_while_away = await helpers.row(db, note)

        await proxy.start()
        row = await eventually(
            lambda: _sent(db, note), what="sent after the database came back"
        )

    assert row_while_away["status"] == "pending"
    assert held[queue] == 0  # held unacked by the consumer, not bounced
    assert row["attempts"] == 1
    assert len(smtp.received) == 1
    assert await helpers.take_dead_letters(settings.amqp_url) == []


async def test_an_email_taken_while_the_database_is_away_is_recorded_once_it_is_back(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    proxy: Proxy,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    note = await helpers.email_row(db, demo.bob, "bob@example.com")
    # Slow to answer the email's content: the database goes while it is in flight.
    smtp.data_delay = 1.5

    async with (
        asyncio.timeout(90),
        email_sender(
            database_url=through(settings, proxy),
            smtp_data_timeout=5,
            email_lease_seconds=15,
        ),
    ):
        await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])
        await eventually(
            lambda: _status_is(db, note, "sending"), what="the email being sent"
        )
        await proxy.cut()
        await eventually(lambda: _received(smtp, 1), what="the email taken")
        await asyncio.sleep(2)  # the sender tries to record it while away
        row_while_away = await helpers.row(db, note)

        await proxy.start()
        row = await eventually(
            lambda: _sent(db, note), what="sent after the database came back"
        )

    assert row_while_away["status"] == "sending"
    # Recorded within its lease: not handed out and sent a second time.
    assert row["attempts"] == 1
    assert len(smtp.received) == 1
    assert await helpers.take_dead_letters(settings.amqp_url) == []


async def _status_is(db: asyncpg.Connection, note: int, status: str) -> bool:
    return (await helpers.row(db, note))["status"] == status


async def _received(smtp: SmtpServer, count: int) -> bool:
    return len(smtp.received) >= count


async def _sent(db: asyncpg.Connection, note: int) -> dict | None:
    row = await helpers.row(db, note)
    return row if row["status"] == "sent" else None


async def test_a_statement_past_its_command_timeout_answers_503(
    settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    # A database that is there but does not answer in time (a lock held, a server
    # overwhelmed) is as away as one that refuses: the client may try again.
    app = create_app(settings.model_copy(update={"db_command_timeout": 1.0}))
    before = await db.fetchval("SELECT count(*) FROM comments")
    async with calling(app, settings, demo.carol, "carol") as client:
        async with db.transaction():
            await db.execute("LOCK TABLE posts IN ACCESS EXCLUSIVE MODE")
            read = await client.get("/posts")
            write = await client.post(
                "/comments", json={"post_id": demo.post, "body": "hi"}
            )

    for resp in (read, write):
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"] == "unavailable"
        assert resp.headers["Retry-After"] == "2"
    assert await db.fetchval("SELECT count(*) FROM comments") == before
    # The statement was sent: it could have committed just as the wait ended,
    # so the writer is not told that sending it again is safe.
    assert read.json()["detail"] == "the database is unavailable; try again"
    assert "may have been stored" in write.json()["detail"]
    assert "Idempotency-Key" in write.json()["detail"]


async def test_a_database_taking_no_writes_for_a_while_answers_503_not_500(
    settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    # A failover or maintenance: the server refuses writes, then takes them.
    name = settings.database_url.rsplit("/", 1)[1]
    await db.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    try:
        app = create_app(settings)
        async with calling(app, settings, demo.carol, "carol") as client:
            refused = await client.post(
                "/comments", json={"post_id": demo.post, "body": "hi"}
            )
    finally:
        await db.execute(
            f'ALTER DATABASE "{name}" SET default_transaction_read_only = off'
        )

    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == "2"
    assert await db.fetchval("SELECT count(*) FROM comments") == 0
