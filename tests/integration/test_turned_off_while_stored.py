"""A notification stored just after its user turned its type off is not sent.

Turning a type off skips the user's rows of it that wait, but cannot see one the
dispatcher was storing at that moment (it read the preference just before), nor
one an operator sets back to pending later with ``requeue-failed``. The senders
look at the preference when they take a row, and skip it there. Here the
preference is stored first and the row after, which is what such a race leaves.
"""

from __future__ import annotations

import asyncpg
import pytest

from contracts.db import create_pool
from contracts.recovery import requeue_failed
from contracts.settings import Settings
from sse_gateway import inbox
from tests.integration import helpers
from tests.integration.conftest import EmailSenderFactory
from tests.sse import helpers as sse
from tests.support.data import Demo
from tests.support.smtp import SmtpServer
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

TURN_OFF = """
INSERT INTO notification_preferences (user_id, type, enabled) VALUES ($1, $2, false)
ON CONFLICT (user_id, type) DO UPDATE SET enabled = false
"""


async def _settled(db: asyncpg.Connection, note: int) -> bool:
    return (await helpers.row(db, note))["status"] in ("sent", "skipped", "failed")


async def test_an_email_stored_after_email_was_turned_off_is_skipped_unsent(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    await db.execute(TURN_OFF, demo.bob, "email")
    note = await helpers.email_row(db, demo.bob, "bob@example.com")
    kept = await helpers.email_row(db, demo.carol, "carol@example.com")

    async with email_sender():
        await helpers.publish(
            settings.amqp_url,
            [helpers.delivery(note, demo.bob), helpers.delivery(kept, demo.carol)],
        )
        for row in (note, kept):
            await eventually(lambda row=row: _settled(db, row), what="both settled")
        dead = await helpers.take_dead_letters(settings.amqp_url)

    skipped = await helpers.row(db, note)
    assert (skipped["status"], skipped["attempts"]) == ("skipped", 0)
    assert skipped["last_error"] == "email disabled by preference"
    assert (await helpers.row(db, kept))["status"] == "sent"
    assert [m.rcpt_tos for m in smtp.received] == [("carol@example.com",)]
    assert dead == []


async def test_a_failed_email_requeued_after_email_was_turned_off_is_skipped(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    note = await helpers.email_row(db, demo.bob, "bob@example.com")
    await db.execute("UPDATE notifications SET status = 'failed' WHERE id = $1", note)
    await db.execute(TURN_OFF, demo.bob, "email")
    event_id = await db.fetchval("SELECT event_id FROM notifications WHERE id=$1", note)

    async with email_sender():
        pool = await create_pool(settings)
        try:
            async with pool.acquire() as conn, conn.transaction():
                assert await requeue_failed(conn, event_id=event_id) == [note]
        finally:
            await pool.close()
        await eventually(lambda: _settled(db, note), what="the requeued row settled")

    assert (await helpers.row(db, note))["status"] == "skipped"
    assert smtp.received == []


async def test_a_live_notification_stored_after_live_was_turned_off_is_skipped(
    settings: Settings, demo: Demo, db: asyncpg.Connection
) -> None:
    await db.execute(TURN_OFF, demo.bob, "sse")
    async with sse.database(settings.database_url) as pg:
        note = await sse.add(pg, demo.bob)
        kept = await sse.add(pg, demo.carol)

        answers = await inbox.deliver_many(pg, [note, kept])
        numbered = await pg.fetchval(
            "SELECT count(*) FROM notifications WHERE inbox_seq IS NOT NULL"
        )

    assert answers == ["skipped", None]
    assert numbered == 1
    skipped = await helpers.row(db, note)
    assert (skipped["status"], skipped["inbox_seq"]) == ("skipped", None)
    assert skipped["last_error"] == "sse disabled by preference"
