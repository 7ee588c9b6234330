"""An SMTP server that takes long to answer the end of an email's content.

RFC 5321 gives that reply ten minutes: a server may store or scan the email first,
so a client that stops waiting cannot tell whether it was taken, and sending it
again may deliver it twice. The email sender waits NOTIFLOW_SMTP_DATA_TIMEOUT for
it, longer than NOTIFLOW_SMTP_TIMEOUT (half a second here) for the other replies.
"""

from __future__ import annotations

import asyncpg
import pytest

from contracts.settings import Settings
from tests.integration import helpers
from tests.integration.conftest import EmailSenderFactory
from tests.support.data import Demo
from tests.support.smtp import SmtpServer
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

BOB = "bob@example.com"


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
async def test_an_email_whose_content_is_answered_slowly_is_sent_once(
    pipelining: bool,
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    smtp.pipelining = pipelining
    # Three times the wait for any other reply, well within the content's.
    smtp.data_delay = 1.5
    note = await helpers.email_row(db, demo.bob, BOB)

    async with email_sender(smtp_data_timeout=5, email_lease_seconds=10):
        await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])

        async def settled() -> dict | None:
            row = await helpers.row(db, note)
            return row if row["status"] in ("sent", "retrying", "failed") else None

        row = await eventually(settled, timeout=15, what=f"row {note} settled")

    assert row["status"] == "sent" and row["attempts"] == 1, row["last_error"]
    assert row["last_error"] is None
    assert list(smtp.message_ids().values()) == [1]
    assert smtp.connections == 1
