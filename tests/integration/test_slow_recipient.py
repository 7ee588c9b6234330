"""An SMTP server slow to take some recipients' emails holds back nobody else's.

A batch of deliveries lasts as long as its slowest SMTP conversation. Here the
server takes seconds over every email to bob; emails to alice that arrive while
eight of bob's are in flight, one batch each (as many as the sender runs at once),
must still go out at once, not wait for bob's.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from contracts.settings import Settings
from tests.integration import helpers
from tests.integration.conftest import EmailSenderFactory
from tests.support.data import Demo
from tests.support.smtp import SmtpServer
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

ALICE = "alice@example.com"
BOB = "bob@example.com"
BOB_SECONDS = 4.0


async def test_emails_to_others_do_not_wait_for_a_slow_recipients(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    smtp.slow_for[BOB] = BOB_SECONDS
    bobs = [await helpers.email_row(db, demo.bob, BOB) for _ in range(8)]
    alices = [await helpers.email_row(db, demo.alice, ALICE) for _ in range(6)]

    async with email_sender(smtp_data_timeout=15, email_lease_seconds=60):
        # One message at a time, so that each of bob's is a batch of its own.
        for note in bobs:
            await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])
            await asyncio.sleep(0.05)
        await eventually(
            lambda: _sending(db, bobs), timeout=10, what="bob's emails in flight"
        )
        for note in alices:
            await helpers.publish(
                settings.amqp_url, [helpers.delivery(note, demo.alice)]
            )

        await eventually(
            lambda: _all_sent(db, bobs + alices),
            timeout=30,
            what="every email sent",
        )

    # When the server had bob's first email and when it had taken it.
    first_to_bob = min(r.at for r in smtp.to(BOB))
    bob_taken = first_to_bob + BOB_SECONDS
    to_alice = smtp.to(ALICE)
    assert len(to_alice) == 6 and len(smtp.to(BOB)) == 8
    # Alice's went out while bob's were still being taken.
    assert max(r.at for r in to_alice) < bob_taken, (
        sorted(r.at - first_to_bob for r in to_alice),
        BOB_SECONDS,
    )
    assert set(smtp.message_ids().values()) == {1}


async def _sending(db: asyncpg.Connection, ids: list[int]) -> bool:
    count = await db.fetchval(
        "SELECT count(*) FROM notifications WHERE id = ANY($1) AND status = 'sending'",
        ids,
    )
    return count == len(ids)


async def _all_sent(db: asyncpg.Connection, ids: list[int]) -> bool:
    count = await db.fetchval(
        "SELECT count(*) FROM notifications WHERE id = ANY($1) AND status = 'sent'",
        ids,
    )
    return count == len(ids)
