"""The dispatcher against the real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import asyncpg
import pytest
from fastapi import FastAPI

from contracts import topology
from contracts.messages import CommentCreated
from contracts.settings import Settings
from dispatcher import templates
from dispatcher.app import DispatcherSettings, create_app
from tests.support.data import Demo, seed_demo
from tests.support.deliveries import deliveries_in
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def demo(settings: Settings) -> Demo:
    return await seed_demo(settings.database_url)


@pytest.fixture
def channel_file(tmp_path: Path) -> Path:
    path = tmp_path / "channels.json"
    path.write_text(
        json.dumps(
            {
                "channels": {
                    "comment.reply": {
                        "types": ["email", "sse"],
                        "template": "comment_reply",
                        "priority": 2,
                    },
                    "comment.mention": {
                        "types": ["email", "sse", "push"],
                        "template": "comment_mention",
                        "priority": 8,
                    },
                }
            }
        )
    )
    return path


@pytest.fixture
async def dispatcher(settings: Settings, channel_file: Path) -> AsyncIterator[None]:
    app = create_app(
        DispatcherSettings(**settings.model_dump(), channel_config=channel_file)
    )
    async with app.router.lifespan_context(app):
        yield


async def add_comment(
    db: asyncpg.Connection, demo: Demo, author: int, body: str
) -> int:
    return await db.fetchval(
        "INSERT INTO comments (post_id, author_id, body) VALUES ($1, $2, $3) "
        "RETURNING id",
        demo.post,
        author,
        body,
    )


def created(demo: Demo, comment_id: int, author: int, body: str) -> CommentCreated:
    return CommentCreated(
        event_id=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
        comment_id=comment_id,
        post_id=demo.post,
        author_id=author,
        body=body,
    )


async def publish(settings: Settings, *events: CommentCreated) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.EVENTS_EXCHANGE)
        for event in events:
            await exchange.publish(
                aio_pika.Message(event.to_bytes(), message_id=str(event.event_id)),
                routing_key=topology.COMMENT_CREATED,
            )


async def drain(
    settings: Settings, channel_type: str
) -> list[aio_pika.IncomingMessage]:
    connection = await aio_pika.connect(settings.amqp_url)
    found = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            topology.delivery_queue(channel_type), passive=True
        )
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            found.append(message)
    return found


async def test_every_type_of_the_channel_gets_a_row_and_a_delivery(
    settings: Settings, demo: Demo, dispatcher: None
) -> None:
    db = await asyncpg.connect(settings.database_url)
    try:
        await db.execute("UPDATE users SET email = NULL WHERE id = $1", demo.dave)
        await db.execute(
            "INSERT INTO notification_preferences VALUES ($1, 'email', false)",
            demo.alice,
        )
        await add_comment(db, demo, demo.dave, "I was here first")
        body = "Thoughts, @bob? Also @dave and @nobody, and me@carol.example"
        comment = await add_comment(db, demo, demo.carol, body)
        event = created(demo, comment, demo.carol, body)

        await publish(settings, event)

        rows = await eventually(
            lambda: db.fetch(
                "SELECT user_id, type, channel, priority, status, last_error, "
                "metadata FROM notifications ORDER BY user_id, type"
            ),
            what="notification rows",
        )
        # Give the relay time to publish the deliveries the rows describe.
        await eventually(lambda: _empty(db), what="outbox drained")
    finally:
        await db.close()

    table = {
        (r["user_id"], r["type"]): {**r, "metadata": json.loads(r["metadata"])}
        for r in rows
    }
    assert set(table) == {
        (demo.alice, "email"),
        (demo.alice, "sse"),
        (demo.bob, "email"),
        (demo.bob, "sse"),
        (demo.bob, "push"),
        (demo.dave, "email"),
        (demo.dave, "sse"),
        (demo.dave, "push"),
    }
    assert table[(demo.alice, "email")]["status"] == "skipped"
    assert table[(demo.alice, "email")]["last_error"] == "email disabled by preference"
    assert table[(demo.dave, "email")]["status"] == "skipped"
    assert table[(demo.dave, "email")]["last_error"] == "user has no email address"
    assert table[(demo.bob, "push")]["priority"] == 8
    assert table[(demo.bob, "sse")]["channel"] == "comment.mention"
    assert table[(demo.alice, "sse")]["channel"] == "comment.reply"
    assert table[(demo.alice, "sse")]["metadata"]["reasons"] == ["post_author"]
    assert table[(demo.dave, "sse")]["metadata"]["reasons"] == [
        "participant",
        "mentioned",
    ]

    emails = [d for m in await drain(settings, "email") for d in deliveries_in(m.body)]
    sse = await drain(settings, "sse")
    push = await drain(settings, "push")
    assert [(d.user_id, d.priority) for d in emails] == [(demo.bob, 8)]
    assert {d.user_id for m in sse for d in deliveries_in(m.body)} == {
        demo.alice,
        demo.bob,
        demo.dave,
    }
    assert len([d for m in push for d in deliveries_in(m.body)]) == 2
    # Rows of one type and priority travel in one message, with that priority.
    assert sorted(m.priority for m in sse) == [2, 8]
    assert sorted(m.priority for m in push) == [8]


async def test_a_redelivered_event_creates_nothing_twice(
    settings: Settings, demo: Demo, dispatcher: None
) -> None:
    db = await asyncpg.connect(settings.database_url)
    try:
        comment = await add_comment(db, demo, demo.bob, "hello")
        event = created(demo, comment, demo.bob, "hello")

        await publish(settings, event, event)
        await publish(settings, event)

        await eventually(
            lambda: db.fetchval("SELECT count(*) FROM events"), what="event stored"
        )
        await eventually(lambda: _empty(db), what="outbox drained")
        await eventually(lambda: _consumed(settings), what="dispatcher queue consumed")
        rows = await db.fetchval("SELECT count(*) FROM notifications")
    finally:
        await db.close()

    assert rows == 2  # alice, by email and live
    assert len(await drain(settings, "email")) == 1
    assert len(await drain(settings, "sse")) == 1


async def test_an_event_under_a_new_id_for_a_dispatched_comment_is_set_aside(
    settings: Settings, demo: Demo, dispatcher: None
) -> None:
    db = await asyncpg.connect(settings.database_url)
    try:
        comment = await add_comment(db, demo, demo.bob, "hello")
        first = created(demo, comment, demo.bob, "hello")
        await publish(settings, first)
        await eventually(
            lambda: _dispatched(db, first.event_id), what="the first event dispatched"
        )
        # The same comment again, under new ids: published by hand, twice at
        # once, and once more later.
        again = [created(demo, comment, demo.bob, "hello") for _ in range(3)]
        await publish(settings, again[0], again[1])
        await publish(settings, again[2])

        reasons = await eventually(
            lambda: _dead_letter_reasons(settings, 3), what="three dead letters"
        )
        rows = await db.fetchval("SELECT count(*) FROM notifications")
        events = await db.fetch("SELECT id FROM events")
    finally:
        await db.close()

    assert rows == 2  # alice, by email and live, once
    assert [e["id"] for e in events] == [first.event_id]
    assert len(reasons) == 3
    assert all(f"dispatched already, by event {first.event_id}" in r for r in reasons)
    assert len(await drain(settings, "email")) == 1


async def _dispatched(db: asyncpg.Connection, event_id: uuid.UUID) -> bool:
    return await db.fetchval(
        "SELECT EXISTS (SELECT FROM events WHERE id = $1)", event_id
    ) and await _empty(db)


async def _empty(db: asyncpg.Connection) -> bool:
    return await db.fetchval("SELECT count(*) FROM outbox") == 0


async def _consumed(settings: Settings) -> bool:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.DISPATCHER_QUEUE, passive=True)
        return queue.declaration_result.message_count == 0


async def test_an_event_about_a_comment_that_does_not_exist_notifies_nobody(
    settings: Settings, demo: Demo, dispatcher: None
) -> None:
    db = await asyncpg.connect(settings.database_url)
    try:
        real = await add_comment(db, demo, demo.bob, "real")
        ghost = created(demo, 999_999, demo.carol, "@bob made up")
        forged = created(demo, real, demo.carol, "@alice not mine")

        await publish(settings, ghost, forged)

        reasons = await eventually(
            lambda: _dead_letter_reasons(settings, 2), what="two dead letters"
        )
        rows = await db.fetchval("SELECT count(*) FROM notifications")
        events = await db.fetchval("SELECT count(*) FROM events")
    finally:
        await db.close()

    assert rows == 0 and events == 0
    assert all("does not exist" in r for r in reasons), reasons


async def _dead_letter_reasons(settings: Settings, count: int) -> list[str] | None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
        if queue.declaration_result.message_count < count:
            return None
        reasons = []
        while (message := await queue.get(fail=False)) is not None:
            reasons.append(str(message.headers[topology.REASON_HEADER]))
            await message.ack()
        return reasons


async def test_a_batch_sets_aside_only_its_event_about_a_missing_comment(
    settings: Settings, demo: Demo, dispatcher: None
) -> None:
    db = await asyncpg.connect(settings.database_url)
    try:
        events = []
        for author, body in [(demo.bob, "one"), (demo.carol, "two @bob")]:
            comment = await add_comment(db, demo, author, body)
            events.append(created(demo, comment, author, body))
        ghost = created(demo, 999_999, demo.carol, "@bob made up")

        await publish(settings, events[0], ghost, events[1])

        reasons = await eventually(
            lambda: _dead_letter_reasons(settings, 1), what="a dead letter"
        )
        stored = await eventually(lambda: _event_ids(db, 2), what="two events stored")
        told = await db.fetch("SELECT DISTINCT event_id FROM notifications")
    finally:
        await db.close()

    assert len(reasons) == 1 and "comment 999999" in reasons[0], reasons
    assert stored == {e.event_id for e in events}
    assert {r["event_id"] for r in told} == stored


async def _event_ids(db: asyncpg.Connection, count: int) -> set | None:
    found = {r["id"] for r in await db.fetch("SELECT id FROM events")}
    return found if len(found) >= count else None


def misspell_mention_template(path: Path) -> None:
    path.write_text(path.read_text().replace('"comment_mention"', '"comment_mentionn"'))
    # Make the change visible even on filesystems with coarse timestamps.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


async def test_an_edit_naming_a_missing_template_leaves_deliveries_running(
    settings: Settings,
    demo: Demo,
    dispatcher: None,
    channel_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    misspell_mention_template(channel_file)
    db = await asyncpg.connect(settings.database_url)
    try:
        body = "over to you, @bob"
        comment = await add_comment(db, demo, demo.carol, body)

        with caplog.at_level(logging.INFO):
            await publish(settings, created(demo, comment, demo.carol, body))
            rows = await eventually(
                lambda: db.fetch(
                    "SELECT type, title FROM notifications WHERE user_id = $1",
                    demo.bob,
                ),
                what="bob's notifications",
            )
    finally:
        await db.close()

    # The last good configuration, and its template, still in force.
    assert {r["type"] for r in rows} == {"email", "sse", "push"}
    assert all("mentioned you" in r["title"] for r in rows)
    refused = [r for r in caplog.records if r.name == "dispatcher.channels"]
    assert refused and refused[0].levelno == logging.ERROR
    assert "channel 'comment.mention'" in refused[0].getMessage()
    assert "template 'comment_mentionn'" in refused[0].getMessage()
    assert "database unavailable" not in caplog.text


def own_templates(
    settings: Settings,
    channel_file: Path,
    tmp_path: Path,
    prepare: Callable[[Path], None] = lambda folder: None,
) -> tuple[FastAPI, Path]:
    """A dispatcher reading a copy of the shipped templates, and that copy's
    folder; ``prepare`` may change the copy before the dispatcher reads it."""
    folder = tmp_path / "templates"
    shutil.copytree(templates.DEFAULT_DIR, folder)
    prepare(folder)
    app = create_app(
        DispatcherSettings(
            **settings.model_dump(), channel_config=channel_file, templates_dir=folder
        )
    )
    return app, folder


async def test_an_event_its_template_cannot_render_is_set_aside_not_held(
    settings: Settings, demo: Demo, channel_file: Path, tmp_path: Path
) -> None:
    # Renders for the check's made-up comment, and divides by zero for a comment
    # of nine characters: only rendering that one finds out.
    def divide_by_the_length(folder: Path) -> None:
        title = folder / "comment_mention" / "title.txt.j2"
        title.write_text("{{ 1 // (comment.body | length - 9) }} " + title.read_text())

    app, _ = own_templates(settings, channel_file, tmp_path, divide_by_the_length)
    db = await asyncpg.connect(settings.database_url)
    try:
        async with app.router.lifespan_context(app):
            mention = await add_comment(db, demo, demo.carol, "@bob look")
            reply = await add_comment(db, demo, demo.bob, "no names here")
            events = [
                created(demo, mention, demo.carol, "@bob look"),
                created(demo, reply, demo.bob, "no names here"),
            ]

            await publish(settings, *events)

            reasons = await eventually(
                lambda: _dead_letter_reasons(settings, 1), what="a dead letter"
            )
            stored = await eventually(
                lambda: _event_ids(db, 1), what="the reply's event stored"
            )
    finally:
        await db.close()

    assert len(reasons) == 1, reasons
    assert "RenderError" in reasons[0]
    assert "comment_mention/title.txt.j2 failed: ZeroDivisionError" in reasons[0]
    assert stored == {events[1].event_id}


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param("{{ broken ", id="does not parse"),
        pytest.param(
            "{% if 'participant' in reasons %}{{ nosuch }}{% endif %}x",
            id="fails only for participants",
        ),
        pytest.param(
            "{{ recipient.display_name.encode('ascii') }}",
            id="fails on names that are not ASCII",
        ),
    ],
)
async def test_a_template_broken_while_running_keeps_its_last_good_version(
    settings: Settings, demo: Demo, channel_file: Path, tmp_path: Path, broken: str
) -> None:
    app, folder = own_templates(settings, channel_file, tmp_path)
    db = await asyncpg.connect(settings.database_url)
    try:
        async with app.router.lifespan_context(app):
            first = await add_comment(db, demo, demo.carol, "@bob look")
            await publish(settings, created(demo, first, demo.carol, "@bob look"))
            await eventually(lambda: _event_ids(db, 1), what="the first event stored")

            title = folder / "comment_mention" / "title.txt.j2"
            st = title.stat()
            title.write_text(broken)
            os.utime(title, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
            second = await add_comment(db, demo, demo.carol, "@bob again")
            await publish(settings, created(demo, second, demo.carol, "@bob again"))
            await eventually(lambda: _event_ids(db, 2), what="the second event stored")

            titles = await db.fetch(
                "SELECT n.title, c.id AS comment FROM notifications n "
                "JOIN events e ON e.id = n.event_id "
                "JOIN comments c ON c.id = (e.payload->>'comment_id')::bigint "
                "WHERE n.user_id = $1 AND n.channel = 'comment.mention' "
                "ORDER BY c.id, n.type",
                demo.bob,
            )
    finally:
        await db.close()

    by_comment = {}
    for row in titles:
        by_comment.setdefault(row["comment"], set()).add(row["title"])
    assert set(by_comment) == {first, second}
    assert by_comment[first] == by_comment[second]
    assert len(by_comment[first]) == 1
    assert "mentioned you" in next(iter(by_comment[first]))
    assert await _dead_letter_reasons(settings, 1) is None


def edit_mention_channel(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data["channels"]["comment.mention"].update(changes)
    path.write_text(json.dumps(data))
    # Make the change visible even on filesystems with coarse timestamps.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {"enabled": False},
            {
                ("alice", "email"): ("comment.reply", 2),
                ("alice", "sse"): ("comment.reply", 2),
            },
            id="mention disabled",
        ),
        pytest.param(
            {"types": ["sse"]},
            {
                ("alice", "email"): ("comment.reply", 2),
                ("alice", "sse"): ("comment.mention", 8),
                ("bob", "sse"): ("comment.mention", 8),
            },
            id="mention by sse only",
        ),
    ],
)
async def test_a_mentioned_post_author_still_gets_what_the_reply_channel_owes(
    settings: Settings,
    demo: Demo,
    dispatcher: None,
    channel_file: Path,
    changes: dict[str, object],
    expected: dict[tuple[str, str], tuple[str, int]],
) -> None:
    edit_mention_channel(channel_file, **changes)
    names = {demo.alice: "alice", demo.bob: "bob"}
    db = await asyncpg.connect(settings.database_url)
    try:
        body = "@bob @alice hi"
        comment = await add_comment(db, demo, demo.carol, body)

        await publish(settings, created(demo, comment, demo.carol, body))

        await eventually(lambda: _event_ids(db, 1), what="the event stored")
        rows = await db.fetch(
            "SELECT user_id, type, channel, priority, status FROM notifications"
        )
        await eventually(lambda: _empty(db), what="outbox drained")
    finally:
        await db.close()

    assert {
        (names[r["user_id"]], r["type"]): (r["channel"], r["priority"]) for r in rows
    } == expected
    assert {r["status"] for r in rows} == {"pending"}
    emails = [d for m in await drain(settings, "email") for d in deliveries_in(m.body)]
    assert [(d.user_id, d.channel) for d in emails] == [(demo.alice, "comment.reply")]


def _bump(path: Path) -> None:
    """Make an edit visible even on filesystems with coarse timestamps."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _edit(channel_file: Path, title: Path, text: str) -> None:
    edit_mention_channel(channel_file, enabled=False)
    title.write_text(text)
    _bump(title)


def _break(channel_file: Path, title: Path) -> None:
    channel_file.write_text(channel_file.read_text() + ",")
    _bump(channel_file)
    title.write_text("{{ commenter.display_name ")
    _bump(title)


async def test_a_broken_edit_falls_back_to_the_edit_before_it_though_no_event_saw_it(
    settings: Settings, demo: Demo, channel_file: Path, tmp_path: Path, caplog
) -> None:
    # Dispatchers sharing the files must agree on the last good version, whichever
    # of them handled events while it was on disk: here, none did.
    app, folder = own_templates(settings, channel_file, tmp_path)
    title = folder / "comment_reply" / "title.txt.j2"
    db = await asyncpg.connect(settings.database_url)
    try:
        async with app.router.lifespan_context(app):
            _edit(channel_file, title, "Edited: {{ commenter.display_name }} replied")

            async def seen() -> bool:
                return (
                    "channel configuration reloaded" in caplog.text
                    and "the edited version is in use" in caplog.text
                )

            # The templates the configuration names are looked at with it, and
            # an edited one is taken up once it has stayed unchanged a second.
            with caplog.at_level(logging.INFO, logger="dispatcher"):
                await eventually(seen, timeout=10, what="the edits taken up")
            _break(channel_file, title)

            body = "@bob, a question"
            comment = await add_comment(db, demo, demo.carol, body)
            await publish(settings, created(demo, comment, demo.carol, body))
            await eventually(lambda: _event_ids(db, 1), what="the event stored")
            rows = await db.fetch(
                "SELECT user_id, channel, title FROM notifications WHERE type = 'sse'"
            )
    finally:
        await db.close()

    # Mentions stayed off: bob hears nothing; alice hears of her post, with the
    # edited title.
    assert {(r["user_id"], r["channel"]) for r in rows} == {
        (demo.alice, "comment.reply")
    }
    assert rows[0]["title"] == "Edited: Zoë 🚀 Carol replied"


async def test_an_emails_html_breaks_lines_where_its_text_does_whatever_ends_them(
    settings: Settings, demo: Demo, dispatcher: None
) -> None:
    body = "one\rtwo\r\nthree\nfour"
    db = await asyncpg.connect(settings.database_url)
    try:
        comment = await add_comment(db, demo, demo.carol, body)
        await publish(settings, created(demo, comment, demo.carol, body))
        metadata = await eventually(
            lambda: db.fetchval(
                "SELECT metadata FROM notifications WHERE user_id = $1 "
                "AND type = 'email'",
                demo.alice,
            ),
            what="alice's email row",
        )
    finally:
        await db.close()

    html = json.loads(metadata)["html"]
    assert "one<br>two<br>three<br>four" in html


async def test_an_event_meeting_a_missing_table_waits_for_it_instead_of_being_set_aside(
    settings: Settings, demo: Demo, dispatcher: None
) -> None:
    async def away(db: asyncpg.Connection, on: bool) -> None:
        here, there = "notifications", "notifications_away"
        if not on:
            here, there = there, here
        await db.execute(f"ALTER TABLE {here} RENAME TO {there}")

    rows, set_aside = await _dispatched_after(settings, demo, away)

    assert rows > 0
    assert set_aside == 0


async def test_an_event_meeting_a_read_only_database_waits_for_it_to_take_writes(
    settings: Settings, demo: Demo, dispatcher: None
) -> None:
    # As during a failover or maintenance: refused for a while, then taken.
    name = settings.database_url.rsplit("/", 1)[1]

    async def read_only(db: asyncpg.Connection, on: bool) -> None:
        await _read_only(db, name, on)

    rows, set_aside = await _dispatched_after(settings, demo, read_only)

    assert rows > 0
    assert set_aside == 0


async def _dispatched_after(
    settings: Settings,
    demo: Demo,
    trouble: Callable[[asyncpg.Connection, bool], Awaitable[None]],
) -> tuple[int, int]:
    """The notifications stored, and the events set aside, for a comment whose
    event came while ``trouble`` was on (for 1.5 s)."""
    body = "while the database was in trouble"
    db = await asyncpg.connect(settings.database_url)
    try:
        comment = await add_comment(db, demo, demo.carol, body)
        await trouble(db, True)
        try:
            await publish(settings, created(demo, comment, demo.carol, body))
            await asyncio.sleep(1.5)
        finally:
            await trouble(db, False)
        rows = await eventually(
            lambda: db.fetchval("SELECT count(*) FROM notifications"),
            what="the comment's notifications",
            timeout=30,
        )
    finally:
        await db.close()
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
        return rows, dead.declaration_result.message_count


async def _read_only(db: asyncpg.Connection, name: str, on: bool) -> None:
    """The database read-only for new sessions, the dispatcher's ended to take it
    up; or writable again, its read-only sessions left as they are."""
    setting = "on" if on else "off"
    await db.execute(
        f'ALTER DATABASE "{name}" SET default_transaction_read_only = {setting}'
    )
    if on:
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
