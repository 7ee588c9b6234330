"""The unsubscribe link of a real email turns that user's emails off, end to end.

Every service runs as its own process, with NOTIFLOW_PUBLIC_URL naming the gateway,
and an SMTP sink (aiosmtpd writing a Maildir) takes the mail.
"""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import asyncpg
import httpx
import pytest

from contracts.auth import issue_token
from contracts.settings import Settings
from tests.support.data import Demo, seed_demo
from tests.support.maildir import messages
from tests.support.processes import Service
from tests.support.sse import SSEClient
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

ROWS = """
SELECT n.user_id, n.type, n.status, n.last_error
FROM notifications n JOIN comments c ON c.id = (n.metadata->>'comment_id')::bigint
WHERE c.id = $1 AND n.type <> 'push'
"""


def mail_to(path: Path, address: str) -> list[email.message.EmailMessage]:
    found = messages(path)
    return [m for m in found if m["To"].addresses[0].addr_spec == address]


async def comment(api: str, token: str, post: int, body: str) -> int:
    async with httpx.AsyncClient(base_url=api) as client:
        answer = await client.post(
            "/comments",
            json={"post_id": post, "body": body},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


async def test_posting_an_emails_unsubscribe_link_stops_the_next_email_only(
    settings: Settings, platform: dict[str, Service], maildir: tuple[Path, int]
) -> None:
    demo: Demo = await seed_demo(settings.database_url)
    bob = issue_token(demo.bob, "bob", settings)
    carol = issue_token(demo.carol, "carol", settings)
    api, gateway = platform["comments"].url, platform["sse-gateway"].url
    mail = maildir[0]

    await comment(api, carol, demo.post, "First thoughts, @bob?")
    [first] = await eventually(
        lambda: _some(mail_to(mail, "bob@example.com")), what="bob's first email"
    )
    link = first["List-Unsubscribe"].removeprefix("<").removesuffix(">")
    assert link.startswith(f"{gateway}/unsubscribe?token=")
    assert first["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    text = first.get_body(("plain",)).get_content().rstrip()
    assert text.endswith(f"Turn off these emails: {link}")
    assert f'href="{link}"' in first.get_body(("html",)).get_content()

    # As a mail client does it: one POST to the header's URL, no credentials.
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            link,
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert answer.status_code == 200, answer.text

    async with SSEClient(f"{gateway}/sse?token={bob}") as stream:
        second = await comment(api, carol, demo.post, "Second thoughts, @bob?")
        [live] = await stream.wait_for("notification")
    assert live.json()["metadata"]["comment_id"] == second

    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        rows = await eventually(
            lambda: _settled(conn, second), what="the second comment's rows settled"
        )
    finally:
        await conn.close()
    assert {(r["user_id"], r["type"]): r["status"] for r in rows} == {
        (demo.alice, "email"): "sent",
        (demo.alice, "sse"): "sent",
        (demo.bob, "email"): "skipped",
        (demo.bob, "sse"): "sent",
    }
    [skipped] = [r for r in rows if (r["user_id"], r["type"]) == (demo.bob, "email")]
    assert skipped["last_error"] == "email disabled by preference"
    # alice's second email is sent, so the sink holds every email there will be.
    assert len(mail_to(mail, "alice@example.com")) == 2
    assert len(mail_to(mail, "bob@example.com")) == 1


async def _some(found: list[email.message.EmailMessage]) -> list | None:
    return found or None


async def _settled(conn: asyncpg.Connection, comment_id: int) -> list | None:
    rows = await conn.fetch(ROWS, comment_id)
    final = ("sent", "skipped", "failed")
    if len(rows) == 4 and all(r["status"] in final for r in rows):
        return rows
    return None
