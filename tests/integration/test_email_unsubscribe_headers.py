"""Every email the sender sends offers one-click unsubscribe (RFC 2369, RFC 8058),
as it reaches a real SMTP server."""

from __future__ import annotations

import asyncpg
import pytest

from contracts.auth import Unsubscribe, unsubscribe_url, verify_unsubscribe_token
from contracts.settings import Settings
from dispatcher.app import DispatcherSettings
from email_sender.app import EmailSettings
from tests.integration import helpers
from tests.integration.conftest import EmailSenderFactory
from tests.support.data import Demo
from tests.support.smtp import Received, SmtpServer
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

PUBLIC_URL = "https://notify.example.com"


async def _received(smtp: SmtpServer, count: int) -> list[Received] | None:
    return list(smtp.received) if len(smtp.received) >= count else None


async def test_each_email_names_its_recipients_own_unsubscribe_url(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
) -> None:
    to_bob = await helpers.email_row(db, demo.bob, "bob@example.com")
    to_carol = await helpers.email_row(db, demo.carol, "carol@example.com")
    await helpers.publish(
        settings.amqp_url,
        [helpers.delivery(to_bob, demo.bob), helpers.delivery(to_carol, demo.carol)],
    )

    async with email_sender(public_url=PUBLIC_URL):
        received = await eventually(
            lambda: _received(smtp, 2), what="two emails", timeout=20
        )

    by_recipient = {r.rcpt_tos: r.message() for r in received}
    for user_id, address in (
        (demo.bob, "bob@example.com"),
        (demo.carol, "carol@example.com"),
    ):
        message = by_recipient[(address,)]
        expected = unsubscribe_url(PUBLIC_URL, user_id, settings.secret_key)
        assert message["List-Unsubscribe"] == f"<{expected}>", address
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        token = expected.partition("?token=")[2]
        assert verify_unsubscribe_token(token, settings.secret_key) == Unsubscribe(
            user_id, "email"
        )


def test_a_public_url_not_in_ascii_is_written_alike_by_sender_and_dispatcher(
    settings: Settings,
) -> None:
    # The sender puts it in List-Unsubscribe, a header, which must be ASCII; the
    # dispatcher puts the same links in the email's text.
    given = {**settings.model_dump(), "public_url": "https://Bücher.example/für"}

    sender = EmailSettings(**given)
    dispatcher = DispatcherSettings(**given)

    written = "https://xn--bcher-kva.example/f%C3%BCr"
    assert sender.public_url == dispatcher.public_url == written
