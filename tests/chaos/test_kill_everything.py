"""Guarantees 1 and 2 under fire: comments keep coming while workers die.

Three hundred comments are posted while the dispatcher, the email sender and the SSE
gateway are SIGKILLed at random moments and restarted, and, with
``NOTIFLOW_TEST_RESTART_BROKER=1``, RabbitMQ itself is stopped and started once.
Afterwards every (event, user, type) row must exist once and be 'sent', the SMTP
server must hold one message per email row (by Message-ID), and every queue must be
empty.

A kill that lands between the SMTP server's "250" and the row's 'sent' makes the
sweeper send that email again with the same Message-ID: mail systems fold such
copies, so they are counted and printed, not treated as a second notification.

RabbitMQ is shared with other work on a developer machine, and restarting it breaks
every connection to it, not only ours: the restart is therefore opt-in, and CI, which
owns its machine, opts in (``.ci/run``). Without it the kills still happen and the
test prints that the restart was skipped. ``stop_app`` and ``start_app`` is the
gentlest restart, and this test does it once.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import pytest

from contracts import topology
from contracts.auth import issue_token
from contracts.settings import Settings
from tests.support.data import Demo, seed_demo
from tests.support.processes import Service
from tests.support.smtp import SmtpServer

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

COMMENTS = 300
MAX_KILLS = 12
CHAOS_SECONDS = 25.0
# How long before a kill an email may have been taken by the SMTP server and still
# not be recorded as sent: the time to commit 'sent' on a busy machine, generously.
KILL_WINDOW_S = 5.0
DRAIN_SECONDS = 90.0
VICTIMS = ("dispatcher", "email-sender", "sse-gateway")
# Per comment by carol on alice's post mentioning bob: alice and bob, each by email
# and in the app (the end-to-end test pins the same set for one comment). Web Push
# is switched off by preference (its sender needs a push service): those rows must
# exist once each and be 'skipped'.
DELIVERED = ("email", "sse")
RESTART_BROKER = "NOTIFLOW_TEST_RESTART_BROKER"


def _why_not_restart_broker() -> str | None:
    """None when the broker may be restarted, else why it may not."""
    value = os.environ.get(RESTART_BROKER)
    if value == "1":
        return None
    if value is None:
        return f"{RESTART_BROKER} is not set"
    return f"{RESTART_BROKER} is {value!r}, not '1'"


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


@pytest.fixture
async def platform(
    settings: Settings, smtp: SmtpServer, tmp_path: Path
) -> AsyncIterator[tuple[dict[str, Service], dict[str, str]]]:
    env = {
        "NOTIFLOW_ENV": "test",
        "NOTIFLOW_DATABASE_URL": settings.database_url,
        "NOTIFLOW_AMQP_URL": settings.amqp_url,
        "NOTIFLOW_SMTP_PORT": str(smtp.port),
        "NOTIFLOW_SMTP_TIMEOUT": "1",
        "NOTIFLOW_SMTP_DATA_TIMEOUT": "0.9",
        "NOTIFLOW_RETRY_DELAYS": "1,2",
        "NOTIFLOW_EMAIL_LEASE_SECONDS": "5",
        "NOTIFLOW_EMAIL_SWEEP_SECONDS": "1",
        "NOTIFLOW_OUTBOX_SWEEP_SECONDS": "0.5",
        "NOTIFLOW_DRAIN_SECONDS": "2",
        "NOTIFLOW_LOG_LEVEL": "WARNING",
        # One user posts every comment, many more than a person may a minute.
        "NOTIFLOW_COMMENTS_PER_MINUTE": "0",
    }
    services = {
        name: Service(name, env, tmp_path).start() for name in ("comments", *VICTIMS)
    }
    try:
        for service in services.values():
            service.wait_ready()
        yield services, env
    finally:
        for service in services.values():
            service.stop()


# How many times a service that exited while starting is started again.
START_AGAIN = 2


def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)


def _restart_broker() -> None:
    _rabbitmqctl("stop_app")
    try:
        time.sleep(1)
    finally:
        _rabbitmqctl("start_app")
    _rabbitmqctl("await_startup")


class Chaos:
    def __init__(
        self,
        services: dict[str, Service],
        env: dict[str, str],
        log_dir: Path,
        *,
        restart_broker: bool,
    ) -> None:
        self.services = services
        self.env = env
        self.log_dir = log_dir
        self.restart_broker = restart_broker
        self.kills: dict[str, int] = dict.fromkeys(VICTIMS, 0)
        # time.monotonic() of each kill, by service
        self.killed_at: dict[str, list[float]] = {name: [] for name in VICTIMS}
        self.broker_restarts = 0
        # Services that exited while starting, and were started again.
        self.started_again = 0

    def kill_and_restart(self, name: str) -> None:
        """SIGKILL, then start a new process without waiting for it: the next kill
        may well land while it is still starting, which is a moment like any other."""
        victim = self.services[name]
        victim.kill()
        self.killed_at[name].append(time.monotonic())
        victim.stop()  # closes its log file; the process is already gone
        self.kills[name] += 1
        self.services[name] = Service(name, self.env, self.log_dir).start()

    async def run(self, seed: int) -> None:
        rng = random.Random(seed)
        started = time.monotonic()
        restart_at = CHAOS_SECONDS / 2
        while (
            time.monotonic() - started < CHAOS_SECONDS
            and sum(self.kills.values()) < MAX_KILLS
        ):
            await asyncio.sleep(rng.uniform(0.5, 2.5))
            if (
                self.restart_broker
                and not self.broker_restarts
                and time.monotonic() - started > restart_at
            ):
                await asyncio.to_thread(_restart_broker)
                self.broker_restarts += 1
                continue
            # Every victim dies at least once before any dies a third time.
            least = min(self.kills.values())
            name = rng.choice([n for n in VICTIMS if self.kills[n] <= least + 1])
            await asyncio.to_thread(self.kill_and_restart, name)
        await asyncio.to_thread(self.all_ready, 45)

    def all_ready(self, timeout: float) -> None:
        """Wait for every service; start again one that exited, as the deployments'
        restart policies do: one restarted just before the broker went away may
        find it gone while starting, and exits."""
        for name in list(self.services):
            for attempt in range(1 + START_AGAIN):
                try:
                    self.services[name].wait_ready(timeout=timeout)
                    break
                except RuntimeError:
                    if attempt == START_AGAIN:
                        raise
                    self.services[name].stop()
                    self.started_again += 1
                    self.services[name] = Service(name, self.env, self.log_dir).start()


async def _post_all(api: str, token: str, post: int) -> list[str]:
    events: list[str] = []
    limit = asyncio.Semaphore(4)

    async def one(client: httpx.AsyncClient, n: int) -> None:
        key = str(uuid.uuid4())
        body = {"post_id": post, "body": f"chaos comment {n}, have a look @bob"}
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key}
        async with limit:
            for _ in range(10):
                try:
                    resp = await client.post("/comments", json=body, headers=headers)
                except httpx.HTTPError:
                    await asyncio.sleep(0.5)
                    continue
                if resp.status_code == 201:
                    events.append(resp.json()["event_id"])
                    return
                await asyncio.sleep(0.5)
            raise AssertionError(f"comment {n} was never accepted")

    async with httpx.AsyncClient(base_url=api, timeout=10) as client:
        tasks = []
        # Spread the posts over the chaos window.
        for n in range(COMMENTS):
            tasks.append(asyncio.create_task(one(client, n)))
            await asyncio.sleep(CHAOS_SECONDS * 0.8 / COMMENTS)
        await asyncio.gather(*tasks)
    return events


async def _depths(amqp_url: str) -> dict[str, int]:
    queues = [
        topology.DISPATCHER_QUEUE,
        topology.DEAD_LETTER_QUEUE,
        *(topology.delivery_queue(t) for t in topology.CHANNEL_TYPES),
        *(level.queue for level in topology.retry_levels((1, 2))),
    ]
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        found = {}
        for name in queues:
            queue = await channel.declare_queue(name, passive=True)
            found[name] = queue.declaration_result.message_count or 0
    return found


async def test_nothing_is_lost_or_doubled_while_services_and_the_broker_die(
    settings: Settings,
    platform: tuple[dict[str, Service], dict[str, str]],
    smtp: SmtpServer,
    tmp_path: Path,
) -> None:
    services, env = platform
    demo: Demo = await seed_demo(settings.database_url)
    token = issue_token(demo.carol, "carol", settings)
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.executemany(
            "INSERT INTO notification_preferences (user_id, type, enabled) "
            "VALUES ($1, 'push', false)",
            [(demo.alice,), (demo.bob,)],
        )
    finally:
        await conn.close()
    why_not = _why_not_restart_broker()
    if why_not is not None:
        print(
            f"\nchaos: RabbitMQ restart skipped: {why_not}; the broker may be shared "
            f"with other work here. Set {RESTART_BROKER}=1 to include it (CI does)."
        )
    chaos = Chaos(services, env, tmp_path, restart_broker=why_not is None)
    seed = random.randrange(1_000_000)

    started = time.monotonic()
    chaos_task = asyncio.create_task(chaos.run(seed))
    events = await _post_all(services["comments"].url, token, demo.post)
    await chaos_task
    chaos_done = time.monotonic()

    conn = await asyncpg.connect(settings.database_url)
    try:
        drained = await _drain(conn, settings, len(events))
        rows = await conn.fetch(
            "SELECT id, event_id::text, user_id, type, status, attempts "
            "FROM notifications"
        )
        outbox = await conn.fetchval("SELECT count(*) FROM outbox")
    finally:
        await conn.close()
    depths = await _depths(settings.amqp_url)

    expected = {
        (event, user, kind)
        for event in events
        for user in (demo.alice, demo.bob)
        for kind in DELIVERED
    }
    pushed = [r for r in rows if r["type"] == "push"]
    rows = [r for r in rows if r["type"] != "push"]
    found = [(r["event_id"], r["user_id"], r["type"]) for r in rows]
    duplicate_rows = len(found) - len(set(found))
    lost = expected - set(found)
    unexpected = set(found) - expected
    not_sent = [dict(r) for r in rows if r["status"] != "sent"]
    email_ids = {
        f"<notification-{r['id']}@notiflow.localhost>"
        for r in rows
        if r["type"] == "email"
    }
    received = smtp.message_ids()
    extra_copies = sum(count - 1 for count in received.values())
    first_copy = smtp.first_arrivals()
    # A copied email whose first copy arrived in no sender's last moments.
    unexplained = [
        message_id
        for message_id, count in received.items()
        if count > 1
        and not any(
            0 <= killed - first_copy[message_id] <= KILL_WINDOW_S
            for killed in chaos.killed_at["email-sender"]
        )
    ]

    print(
        f"\nchaos (seed {seed}): comments={len(events)} deliveries={len(rows)} "
        f"emails={len(email_ids)} kills={chaos.kills} "
        f"broker_restarts={chaos.broker_restarts} started_again={chaos.started_again} "
        f"duplicate_rows={duplicate_rows} lost_rows={len(lost)} "
        f"emails_missing={len(email_ids - set(received))} "
        f"email_copies_with_same_message_id={extra_copies} "
        f"copies_not_explained_by_a_kill={len(unexplained)} "
        f"time_to_drain={drained - chaos_done:.1f}s "
        f"total={time.monotonic() - started:.1f}s"
    )

    assert len(events) == COMMENTS
    assert chaos.broker_restarts == (0 if why_not is not None else 1)
    assert duplicate_rows == 0 and not lost and not unexpected
    assert len(rows) == len(DELIVERED) * 2 * COMMENTS
    assert not_sent == []
    assert len({(r["event_id"], r["user_id"]) for r in pushed}) == len(pushed)
    assert {r["status"] for r in pushed} <= {"skipped"}
    # One message per email row, by Message-ID; nothing else arrived.
    assert set(received) == email_ids
    # A second copy can only come from a kill between the SMTP reply and 'sent':
    # the first copy of every copied email arrived shortly before a sender died.
    # How many one kill copies depends on how many emails were in flight.
    assert unexplained == [], unexplained
    assert outbox == 0
    assert set(depths.values()) == {0}, depths


async def _drain(conn: asyncpg.Connection, settings: Settings, events: int) -> float:
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline:
        sent, total = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'sent'), count(*) "
            "FROM notifications WHERE type <> 'push'"
        )
        if total == len(DELIVERED) * 2 * events and sent == total:
            if set((await _depths(settings.amqp_url)).values()) == {0}:
                return time.monotonic()
        await asyncio.sleep(0.5)
    return time.monotonic()
