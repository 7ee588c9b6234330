"""Turning a channel type off stops what of it is still waiting to go out.

Emails queued (``pending``) or between attempts (``retrying``) when a user turns
email off, in ``PATCH /preferences`` or with the unsubscribe link, are ``skipped``
in the same transaction; one already ``sending`` is in a sender's hands and is
left to it. On the real PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest

from contracts.auth import issue_token, unsubscribe_token
from contracts.settings import Settings
from sse_gateway import preferences
from sse_gateway.app import GatewaySettings, create_app
from tests.support.data import Demo

pytestmark = pytest.mark.integration

ADD_EVENT = """
INSERT INTO events (id, type, payload, occurred_at)
VALUES ($1, 'comment.created', '{}', now())
"""

ADD_ROW = """
INSERT INTO notifications (
    event_id, user_id, email, title, message, type, channel, status, attempts,
    last_error, next_attempt_at, lease_expires_at, event_occurred_at
)
VALUES (
    $1, $2, 'someone@example.com', 'A reply', 'hello', $3, 'comment.reply', $4,
    $5, $6,
    CASE WHEN $4 = 'retrying' THEN now() + interval '1 hour' END,
    CASE WHEN $4 = 'sending' THEN now() + interval '1 minute' END,
    now()
)
RETURNING id
"""

STATE = "SELECT status, last_error, next_attempt_at FROM notifications WHERE id = $1"


@asynccontextmanager
async def gateway(
    settings: Settings, user_id: int | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewaySettings(**settings.model_dump()))
    headers = {}
    if user_id is not None:
        headers["Authorization"] = f"Bearer {issue_token(user_id, 'u', settings)}"
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://t",
            headers=headers,
        ) as client,
    ):
        yield client


async def add(
    db: asyncpg.Connection, user_id: int, channel_type: str, status: str
) -> int:
    event_id = uuid.uuid4()
    await db.execute(ADD_EVENT, event_id)
    attempts = 0 if status == "pending" else 1
    error = "SMTP 451 try later" if status == "retrying" else None
    return await db.fetchval(
        ADD_ROW, event_id, user_id, channel_type, status, attempts, error
    )


async def state(db: asyncpg.Connection, notification_id: int) -> dict[str, Any]:
    return dict(await db.fetchrow(STATE, notification_id))


def changes(caplog: pytest.LogCaptureFixture) -> list[Any]:
    return [
        r for r in caplog.records if getattr(r, "action", None) == "preferences.changed"
    ]


async def test_turning_email_off_skips_the_users_emails_still_waiting(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    queued = await add(db, demo.bob, "email", "pending")
    between_attempts = await add(db, demo.bob, "email", "retrying")
    in_hand = await add(db, demo.bob, "email", "sending")
    sent = await add(db, demo.bob, "email", "sent")
    push = await add(db, demo.bob, "push", "pending")
    alices = await add(db, demo.alice, "email", "retrying")

    with caplog.at_level("INFO", logger="sse_gateway.api"):
        async with gateway(settings, demo.bob) as bob:
            answer = await bob.patch("/preferences", json={"email": False})

    assert answer.status_code == 200, answer.text
    assert answer.json() == {"email": False, "sse": True, "push": True}
    for stopped in (queued, between_attempts):
        assert await state(db, stopped) == {
            "status": "skipped",
            "last_error": "email disabled by preference",
            "next_attempt_at": None,
        }
    assert (await state(db, in_hand))["status"] == "sending"
    assert (await state(db, sent))["status"] == "sent"
    assert (await state(db, push))["status"] == "pending"
    assert (await state(db, alices))["status"] == "retrying"
    [logged] = changes(caplog)
    assert logged.skipped == 2
    assert logged.getMessage() == (
        "preferences changed: email off; 2 waiting notifications skipped"
    )


async def test_turning_email_back_on_revives_no_skipped_email(
    settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    queued = await add(db, demo.bob, "email", "pending")
    async with gateway(settings, demo.bob) as bob:
        off = await bob.patch("/preferences", json={"email": False})
        on = await bob.patch("/preferences", json={"email": True})
        queued_since = await add(db, demo.bob, "email", "pending")
        # Turning another type off leaves the emails alone.
        other = await bob.patch("/preferences", json={"push": False})

    assert [off.status_code, on.status_code, other.status_code] == [200, 200, 200]
    assert on.json()["email"] is True
    assert (await state(db, queued))["status"] == "skipped"
    assert (await state(db, queued_since))["status"] == "pending"


async def test_the_unsubscribe_link_skips_the_users_emails_still_waiting(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    between_attempts = await add(db, demo.bob, "email", "retrying")
    link = f"/unsubscribe?token={unsubscribe_token(demo.bob, settings.secret_key)}"

    with caplog.at_level("INFO", logger="sse_gateway.unsubscribe"):
        async with gateway(settings) as mail_client:
            answer = await mail_client.post(
                link,
                content=b"List-Unsubscribe=One-Click",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )

    assert answer.status_code == 200, answer.text
    assert await state(db, between_attempts) == {
        "status": "skipped",
        "last_error": "email disabled by preference",
        "next_attempt_at": None,
    }
    [logged] = changes(caplog)
    assert logged.skipped == 1
    assert "1 waiting notifications skipped" in logged.getMessage()


ADD_MANY_EVENTS = """
INSERT INTO events (id, type, payload, occurred_at)
SELECT gen_random_uuid(), 'comment.created', '{}', now()
FROM generate_series(1, $1)
RETURNING id
"""

# Mostly delivered history, spread over the users, and a few rows of each kind
# still waiting.
ADD_MANY_ROWS = """
INSERT INTO notifications (
    event_id, user_id, title, message, type, channel, status, event_occurred_at
)
SELECT e.id, ($2::bigint[])[1 + n % cardinality($2::bigint[])], 't', 'm',
       (ARRAY['email', 'sse', 'push'])[1 + n / 7 % 3], 'comment.reply',
       CASE WHEN n % 100 = 0 THEN 'pending'
            WHEN n % 100 = 1 THEN 'retrying'
            ELSE 'sent' END,
       now()
FROM unnest($1::uuid[]) WITH ORDINALITY AS e(id, n)
"""


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", []) for n in plan_nodes(child))]


async def test_skipping_reads_the_waiting_rows_through_their_indexes(
    demo: Demo, db: asyncpg.Connection
) -> None:
    users = [demo.alice, demo.bob, demo.carol, demo.dave]
    events = [r["id"] for r in await db.fetch(ADD_MANY_EVENTS, 40_000)]
    await db.execute(ADD_MANY_ROWS, events, users)
    await db.execute("ANALYZE notifications")

    explained = await db.fetchval(
        "EXPLAIN (FORMAT JSON) " + preferences.SKIP_WAITING, demo.bob, ["email"]
    )
    # The connection decodes json, the plan's type, as it reads it.
    nodes = plan_nodes(explained[0]["Plan"])

    scans = {n["Node Type"] for n in nodes if "Scan" in n["Node Type"]}
    assert "Seq Scan" not in scans, nodes
    assert {n.get("Index Name") for n in nodes} >= {
        "notifications_pending_idx",
        "notifications_status_idx",
    }
