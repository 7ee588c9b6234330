"""A comment becomes emails in the SMTP sink and a live event in a browser stream.

Every service runs as its own process against a private database and virtual host,
with a real SMTP server (aiosmtpd writing a Maildir, as ``make run`` starts it).
"""

from __future__ import annotations

import email
import email.policy
import json
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


async def test_mention_reaches_inboxes_and_the_live_stream(
    settings: Settings, platform: dict[str, Service], maildir: tuple[Path, int]
) -> None:
    demo: Demo = await seed_demo(settings.database_url)
    bob = issue_token(demo.bob, "bob", settings)
    carol = issue_token(demo.carol, "carol", settings)
    gateway = platform["sse-gateway"].url
    api = platform["comments"].url

    async with SSEClient(f"{gateway}/sse?token={bob}") as stream:
        async with httpx.AsyncClient(base_url=api) as client:
            resp = await client.post(
                "/comments",
                json={"post_id": demo.post, "body": "Nice post! @bob, have a look."},
                headers={"Authorization": f"Bearer {carol}"},
            )
        assert resp.status_code == 201, resp.text
        comment = resp.json()
        assert comment["author"]["display_name"] == "Zoë 🚀 Carol"

        [live] = await stream.wait_for("notification")

    note = live.json()
    assert live.id == str(note["id"])
    assert note["type"] == "sse" and note["channel"] == "comment.mention"
    assert note["title"] == "Zoë 🚀 Carol mentioned you on “Welcome to notiflow”"
    assert "Nice post! @bob, have a look." in note["message"]
    assert note["metadata"]["comment_id"] == comment["id"]
    assert note["metadata"]["reasons"] == ["mentioned"]
    assert {
        "id",
        "title",
        "message",
        "channel",
        "type",
        "metadata",
        "created_at",
    } <= set(note)

    mails = await eventually(
        lambda: _two(maildir[0]), what="two emails in the sink", timeout=20
    )
    by_recipient = {m["To"].addresses[0].addr_spec: m for m in mails}
    assert set(by_recipient) == {"alice@example.com", "bob@example.com"}
    to_bob = by_recipient["bob@example.com"]
    assert (
        str(to_bob["Subject"]) == "Zoë 🚀 Carol mentioned you on “Welcome to notiflow”"
    )
    assert to_bob["To"].addresses[0].display_name == "Bob Dupont"
    text = to_bob.get_body(("plain",)).get_content()
    html = to_bob.get_body(("html",)).get_content()
    assert "Nice post! @bob, have a look." in text
    assert "Zoë 🚀 Carol" in html
    to_alice = by_recipient["alice@example.com"]
    assert str(to_alice["Subject"]) == "Zoë 🚀 Carol commented on “Welcome to notiflow”"

    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await eventually(
            lambda: _all_sent(conn), what="every notification row sent"
        )
        carol_rows = await conn.fetchval(
            "SELECT count(*) FROM notifications WHERE user_id = $1", demo.carol
        )
    finally:
        await conn.close()
    assert sorted((r["user_id"], r["type"]) for r in rows) == sorted(
        [
            (demo.alice, "email"),
            (demo.alice, "sse"),
            (demo.bob, "email"),
            (demo.bob, "sse"),
        ]
    )
    for row in rows:
        if row["type"] == "email":
            msg_id = by_recipient[row["email"]]["Message-ID"]
            assert msg_id == f"<notification-{row['id']}@notiflow.localhost>"
    assert carol_rows == 0


async def test_a_user_who_turned_email_off_gets_the_live_event_and_no_email(
    settings: Settings, platform: dict[str, Service], maildir: tuple[Path, int]
) -> None:
    demo: Demo = await seed_demo(settings.database_url)
    bob = issue_token(demo.bob, "bob", settings)
    carol = issue_token(demo.carol, "carol", settings)
    gateway = platform["sse-gateway"].url

    async with httpx.AsyncClient() as client:
        turned_off = await client.patch(
            f"{gateway}/preferences",
            json={"email": False},
            headers={"Authorization": f"Bearer {bob}"},
        )
        assert turned_off.json() == {"email": False, "sse": True, "push": True}
        async with SSEClient(f"{gateway}/sse?token={bob}") as stream:
            resp = await client.post(
                f"{platform['comments'].url}/comments",
                json={"post_id": demo.post, "body": "Over to you, @bob"},
                headers={"Authorization": f"Bearer {carol}"},
            )
            assert resp.status_code == 201, resp.text
            [live] = await stream.wait_for("notification")

    assert live.json()["channel"] == "comment.mention"
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await eventually(
            lambda: _settled(conn), what="every notification row settled"
        )
    finally:
        await conn.close()
    assert {(r["user_id"], r["type"]): r["status"] for r in rows} == {
        (demo.alice, "email"): "sent",
        (demo.alice, "sse"): "sent",
        (demo.bob, "email"): "skipped",
        (demo.bob, "sse"): "sent",
    }
    [bob_email] = [r for r in rows if r["user_id"] == demo.bob and r["type"] == "email"]
    assert bob_email["last_error"] == "email disabled by preference"
    # alice's email row is sent, so the sink holds every email there will be.
    mails = messages(maildir[0])
    assert [m["To"].addresses[0].addr_spec for m in mails] == ["alice@example.com"]


async def _two(path: Path) -> list[email.message.EmailMessage] | None:
    found = messages(path)
    return found if len(found) >= 2 else None


async def _all_sent(conn: asyncpg.Connection) -> list[asyncpg.Record] | None:
    rows = await conn.fetch(
        # Push rows wait for the push sender, which this test does not run.
        "SELECT id, user_id, type, status, email FROM notifications "
        "WHERE type <> 'push'"
    )
    if rows and all(r["status"] == "sent" for r in rows) and len(rows) == 4:
        return rows
    return None


async def _settled(conn: asyncpg.Connection) -> list[asyncpg.Record] | None:
    rows = await conn.fetch(
        "SELECT user_id, type, status, last_error FROM notifications "
        "WHERE type <> 'push'"
    )
    final = ("sent", "skipped", "failed")
    if len(rows) == 4 and all(r["status"] in final for r in rows):
        return rows
    return None


def _samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Each sample of metric ``name`` in a Prometheus text page, by its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[frozenset[tuple[str, str]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[frozenset(sample.labels.items())] = sample.value
    return found


def _value(text: str, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for k, v in _samples(text, name).items() if wanted <= k)


async def test_metrics_and_one_trace_follow_a_comment_through_every_service(
    settings: Settings, platform: dict[str, Service], maildir: tuple[Path, int]
) -> None:
    demo: Demo = await seed_demo(settings.database_url)
    carol = issue_token(demo.carol, "carol", settings)

    async with httpx.AsyncClient() as client:
        resp = await client.post(
            f"{platform['comments'].url}/comments",
            json={"post_id": demo.post, "body": "Ping @bob"},
            headers={"Authorization": f"Bearer {carol}"},
        )
        assert resp.status_code == 201
        event_id = resp.json()["event_id"]
        await eventually(lambda: _two(maildir[0]), what="two emails", timeout=20)

        async def scrape(name: str) -> str:
            return (await client.get(f"{platform[name].url}/metrics")).text

        async def sse_sent() -> str | None:
            page = await scrape("sse-gateway")
            sent = _value(
                page, "notiflow_notifications_total", type="sse", status="sent"
            )
            return page if sent == 2 else None

        sse = await eventually(sse_sent, what="two live notifications counted")
        dispatcher = await scrape("dispatcher")
        email = await scrape("email-sender")

        async def published_everything() -> bool:
            # Every relay drains the same outbox, so any of them may have published
            # a given row: the event, then alice's and bob's email and live
            # deliveries, and bob's push delivery (no push sender runs here).
            pages = [
                await scrape(s) for s in ("comments", "dispatcher", "email-sender")
            ]
            return sum(_value(p, "notiflow_outbox_published_total") for p in pages) == 6

        await eventually(published_everything, what="six messages published")

    # alice (the author) and bob (mentioned) each get an email and a live event.
    created = _samples(dispatcher, "notiflow_notifications_total")
    assert (
        _value(
            dispatcher, "notiflow_notifications_total", type="email", status="created"
        )
        == 2
    )
    assert (
        _value(dispatcher, "notiflow_notifications_total", type="sse", status="created")
        == 2
    )
    assert created, "the dispatcher exposes its counters"
    assert (
        _value(email, "notiflow_notifications_total", type="email", status="sent") == 2
    )
    assert _value(email, "notiflow_delivery_latency_seconds_count", type="email") == 2
    assert _value(sse, "notiflow_delivery_latency_seconds_count", type="sse") == 2
    assert (
        _value(
            dispatcher,
            "notiflow_messages_handled_total",
            queue="notiflow.dispatcher.comment-created",
            outcome="acked",
        )
        == 1
    )

    def trace_ids(service: Service) -> set[str]:
        ids = set()
        for line in service.log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("trace_id") and (
                entry.get("event_id") == event_id
                or entry.get("action") in ("email.sent", "sse.delivered")
            ):
                ids.add(entry["trace_id"])
        return ids

    per_service = {
        name: trace_ids(platform[name])
        for name in ("comments", "dispatcher", "email-sender", "sse-gateway")
    }
    assert all(len(ids) == 1 for ids in per_service.values()), per_service
    assert len(set.union(*per_service.values())) == 1, per_service
