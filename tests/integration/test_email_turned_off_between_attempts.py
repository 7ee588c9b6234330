"""An email waiting for its next attempt is not sent once its user turns email off.

The mail server is away for the first attempt, so the row waits ``retrying`` with
its message in a delay queue; the user turns email off; when the message comes
back, the sender finds the row ``skipped``, acks it and sends nothing. Retry delays
are 1 s and 2 s.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest

from contracts.auth import issue_token
from contracts.settings import Settings
from sse_gateway.app import GatewaySettings, create_app
from tests.integration import helpers
from tests.integration.conftest import EmailSenderFactory
from tests.support.data import Demo
from tests.support.smtp import SmtpServer
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

BOB = "bob@example.com"


@asynccontextmanager
async def gateway(settings: Settings, user_id: int) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewaySettings(**settings.model_dump()))
    token = issue_token(user_id, "bob", settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://t",
            headers={"Authorization": f"Bearer {token}"},
        ) as client,
    ):
        yield client


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().endswith("; nothing to send")
    ]


async def test_an_email_waiting_to_retry_is_not_sent_after_email_is_turned_off(
    settings: Settings,
    demo: Demo,
    db: asyncpg.Connection,
    smtp: SmtpServer,
    email_sender: EmailSenderFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    smtp.then("drop")
    note = await helpers.email_row(db, demo.bob, BOB)

    with caplog.at_level(logging.INFO, logger="email_sender.worker"):
        async with email_sender():
            await helpers.publish(settings.amqp_url, [helpers.delivery(note, demo.bob)])

            async def retrying() -> dict[str, Any] | None:
                row = await helpers.row(db, note)
                return row if row["status"] == "retrying" else None

            await eventually(retrying, interval=0.05, what="the first attempt failed")
            async with gateway(settings, demo.bob) as bob:
                answer = await bob.patch("/preferences", json={"email": False})
            assert answer.status_code == 200, answer.text

            # The retry comes back from its delay queue and is acked unsent.
            async def handled() -> bool:
                return bool(refusals(caplog) or smtp.received)

            await eventually(handled, what="the retry handled")
            dead = await helpers.take_dead_letters(settings.amqp_url)

    row = await helpers.row(db, note)
    assert smtp.received == [] and smtp.connections == 1
    assert refusals(caplog) == ["notification is skipped; nothing to send"]
    assert row["status"] == "skipped"
    assert row["last_error"] == "email disabled by preference"
    assert dead == []
