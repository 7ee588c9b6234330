"""The workload: five users, threads where every comment reaches three of them.

Each step gets fresh posts, so the participants query of the dispatcher (every
earlier commenter of the post) costs the same in the last step as in the first.
For commenter ``c`` (users 0..4), a post belongs to user ``c+1`` and already has
comments by ``c+2`` and ``c+3``; a comment by ``c`` then notifies those three, by
email and live, and never ``c+4`` or ``c`` itself.

Load is open-loop: comment ``i`` of a step is due at ``start + i / rate`` and is
sent then, whether or not earlier requests were answered; its latencies count from
that due time, so a server that stalls is charged for the queue it causes
(no coordinated omission). Requests in flight are bounded: a comment due while the
bound is reached is not sent and is counted as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aio_pika
import asyncpg

from bench import http1
from contracts import topology
from contracts.auth import issue_token
from contracts.settings import Settings

USERS = 5
POSTS_PER_COMMENTER = 20
SAMPLE_EVERY_S = 0.5
CONNECT_TIMEOUT_S = 10.0
STREAM_SILENCE_S = 60.0

_COMMENT_ID = re.compile(rb'"comment_id":\s*(\d+)')
# The gateway sends the notification id as the event's id.
_EVENT_ID = re.compile(rb"^id:\s*(\d+)", re.M)
# Events end with a blank line; sse-starlette ends lines with CRLF, others with LF.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


@dataclass
class Cast:
    """The bench's users and their tokens."""

    user_ids: list[int]
    tokens: list[str]


async def create_users(database_url: str, settings: Settings) -> Cast:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = [
            (f"bench_{i}", f"bench{i}@example.com", f"Bench User {i}")
            for i in range(USERS)
        ]
        await conn.executemany(
            "INSERT INTO users (username, email, display_name) VALUES ($1, $2, $3) "
            "ON CONFLICT (username) DO NOTHING",
            rows,
        )
        ids = dict(
            await conn.fetch(
                "SELECT username, id FROM users WHERE username = ANY($1::text[])",
                [r[0] for r in rows],
            )
        )
    finally:
        await conn.close()
    user_ids = [ids[f"bench_{i}"] for i in range(USERS)]
    tokens = [
        issue_token(uid, f"bench_{i}", settings, ttl_seconds=24 * 3600)
        for i, uid in enumerate(user_ids)
    ]
    return Cast(user_ids, tokens)


async def create_posts(database_url: str, cast: Cast) -> list[list[int]]:
    """Fresh posts per commenter, each with two earlier comments by others."""
    ids = cast.user_ids
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        async with conn.transaction():
            by_commenter = []
            for c in range(USERS):
                author = ids[(c + 1) % USERS]
                posts = await conn.fetch(
                    "INSERT INTO posts (author_id, title, body) "
                    "SELECT $1, 'Bench thread ' || g, 'A thread for the bench.' "
                    "FROM generate_series(1, $2) AS g RETURNING id",
                    author,
                    POSTS_PER_COMMENTER,
                )
                post_ids = [r["id"] for r in posts]
                earlier = [
                    (p, ids[(c + k) % USERS], "An earlier comment.")
                    for p in post_ids
                    for k in (2, 3)
                ]
                await conn.executemany(
                    "INSERT INTO comments (post_id, author_id, body) "
                    "VALUES ($1, $2, $3)",
                    earlier,
                )
                by_commenter.append(post_ids)
    finally:
        await conn.close()
    return by_commenter


class Streams:
    """One SSE stream per user, read in this process; notes each event's arrival.

    The streams are read with the bench's own HTTP client (bench/http1.py): the
    events of every comment arrive here three times, and httpx's stream machinery
    cost more per event than the parsing below.
    """

    def __init__(self, sse_url: str, cast: Cast) -> None:
        parts = urlsplit(sse_url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._authority = parts.netloc
        self._cast = cast
        # (comment id, notification id, perf_counter when the event's last byte
        # was read)
        self.arrivals: list[tuple[int, int, float]] = []
        self.disconnects = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: list[asyncio.Event] = []
        self._stopping = False

    async def __aenter__(self) -> Streams:
        for token in self._cast.tokens:
            ready = asyncio.Event()
            self._ready.append(ready)
            self._tasks.append(asyncio.create_task(self._read(token, ready)))
        await asyncio.wait_for(
            asyncio.gather(*(r.wait() for r in self._ready)), timeout=20
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _read(self, token: str, ready: asyncio.Event) -> None:
        request = http1.prepare(
            "GET",
            "/sse",
            self._authority,
            {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"},
        )
        # Reconnects are bounded: a gateway that keeps dropping streams ends the run
        # with missing deliveries rather than a busy loop.
        for _ in range(20):
            conn = http1.Connection(self._host, self._port)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    status = await conn.start(request)
                if status == 200:
                    await self._consume(conn, ready)
            except (http1.RequestFailed, TimeoutError):
                pass
            finally:
                conn.close()
            if self._stopping:
                return
            self.disconnects += 1
            await asyncio.sleep(0.5)

    async def _consume(self, conn: http1.Connection, ready: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        buffer = b""
        # The gateway sends a heartbeat every 15 s; a stream silent for much longer
        # is dead, whatever TCP says.
        async with asyncio.timeout(STREAM_SILENCE_S) as silence:
            async for chunk in conn.body():
                now = time.perf_counter()
                silence.reschedule(loop.time() + STREAM_SILENCE_S)
                buffer += chunk
                *events, buffer = _EVENT_END.split(buffer)
                for event in events:
                    if b"event: notification" in event:
                        comment = _COMMENT_ID.search(event)
                        notification = _EVENT_ID.search(event)
                        if comment and notification:
                            self.arrivals.append(
                                (int(comment.group(1)), int(notification.group(1)), now)
                            )
                    elif event.startswith((b": connected", b":connected")):
                        ready.set()


@dataclass
class Sent:
    """Comments of one step: due time by comment id, and what went wrong."""

    due: dict[int, float] = field(default_factory=dict)
    post_ms: list[float] = field(default_factory=list)
    scheduled: int = 0
    errors: int = 0
    skipped: int = 0
    error_samples: list[str] = field(default_factory=list)


async def offer(
    pool: http1.Pool,
    cast: Cast,
    posts: list[list[int]],
    rate: float,
    duration: float,
    max_in_flight: int,
    sent: Sent,
) -> Sent:
    """Send ``rate * duration`` comments on the clock; wait for their answers.

    ``sent`` fills up while this runs, so a sampler can read it meanwhile.
    """
    requests = [
        pool.prepare(
            "POST",
            "/comments",
            {"Authorization": f"Bearer {t}", "Content-Type": "application/json"},
        )
        for t in cast.tokens
    ]
    in_flight: set[asyncio.Task[None]] = set()
    total = int(rate * duration)
    sent.scheduled = total

    def failed(sample: str) -> None:
        sent.errors += 1
        if len(sent.error_samples) < 5:
            sent.error_samples.append(sample)

    async def post(index: int, due: float) -> None:
        commenter = index % USERS
        thread = posts[commenter][(index // USERS) % len(posts[commenter])]
        body = b'{"post_id":%d,"body":"Bench comment %d."}' % (thread, index)
        try:
            resp = await pool.send(requests[commenter], body)
        except http1.RequestFailed as exc:
            failed(repr(exc))
            return
        done = time.perf_counter()
        if resp.status != 201:
            failed(f"{resp.status} {resp.body[:200].decode(errors='replace')}")
            return
        try:
            comment_id = int(json.loads(resp.body)["id"])
        except (ValueError, KeyError, TypeError):
            failed(
                f"201 without a comment id: {resp.body[:200].decode(errors='replace')}"
            )
            return
        sent.due[comment_id] = due
        sent.post_ms.append((done - due) * 1000)

    start = time.perf_counter() + 0.05
    for index in range(total):
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif index % 20 == 0:
            await asyncio.sleep(0)  # behind schedule: still let responses in
        if len(in_flight) >= max_in_flight:
            sent.skipped += 1
            continue
        task = asyncio.create_task(post(index, due))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight, timeout=60)
    return sent


class QueueWatch:
    """Depths of the platform's queues: RabbitMQ by passive declare, the outboxes."""

    QUEUES = (
        topology.DISPATCHER_QUEUE,
        topology.delivery_queue("email"),
        topology.delivery_queue("sse"),
    )

    def __init__(self, amqp_url: str, database_url: str) -> None:
        self._amqp_url = amqp_url
        self._database_url = database_url
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._db: asyncpg.Connection | None = None

    async def __aenter__(self) -> QueueWatch:
        self._connection = await aio_pika.connect(self._amqp_url, timeout=10)
        self._channel = await self._connection.channel()
        self._db = await asyncpg.connect(self._database_url, timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._db is not None:
            await self._db.close()
        if self._connection is not None:
            await self._connection.close()

    @property
    def db(self) -> asyncpg.Connection:
        if self._db is None:
            raise RuntimeError("QueueWatch is not open")
        return self._db

    async def depths(self) -> dict[str, float]:
        """Messages ready in each queue (unacked ones are in a consumer's hands)."""
        if self._channel is None:
            raise RuntimeError("QueueWatch is not open")
        found: dict[str, float] = {}
        for name in self.QUEUES:
            queue = await self._channel.declare_queue(name, passive=True)
            found[name.removeprefix("notiflow.")] = float(
                queue.declaration_result.message_count or 0
            )
        found["outbox"] = float(
            await self.db.fetchval("SELECT count(*) FROM outbox", timeout=5)
        )
        return found

    async def comment_of(self, notification_ids: list[int]) -> dict[int, int]:
        """The comment behind each email notification, read from its row."""
        if not notification_ids:
            return {}
        rows = await self.db.fetch(
            "SELECT id, (metadata->>'comment_id')::bigint AS comment_id "
            "FROM notifications WHERE id = ANY($1::bigint[])",
            notification_ids,
            timeout=30,
        )
        return {r["id"]: r["comment_id"] for r in rows}


async def sample_while(
    running: Callable[[], bool],
    started: float,
    watch: QueueWatch,
    owed: Callable[[], float],
    backlog: list[tuple[float, float]],
    queues: dict[str, list[tuple[float, float]]],
) -> None:
    """Every half second: the deliveries owed and each queue's depth."""
    while running():
        now = time.perf_counter() - started
        backlog.append((round(now, 2), owed()))
        with contextlib.suppress(Exception):
            for name, depth in (await watch.depths()).items():
                queues.setdefault(name, []).append((round(now, 2), depth))
        await asyncio.sleep(SAMPLE_EVERY_S)
