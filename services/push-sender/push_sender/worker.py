"""One push delivery: claim the row, push to every device of the user, record.

The row's status decides everything, as for email: a conditional UPDATE claims it
(``pending``, ``retrying`` once it is due, or ``sending`` whose lease ran out), and a
row already ``sent``, ``failed`` or ``skipped`` is acked untouched.

The row is ``sent`` as soon as one device accepted the push; the devices that
answered "later" at the same time are not tried again, since the person has been
told. With no device accepting, one that asked for later makes the whole row retry,
never sooner than the longest Retry-After any device gave. Retry queues have fixed
delays, so a Retry-After longer than the longest delay parks the message more than
once: a message that comes back before ``next_attempt_at`` is parked again without
counting an attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import Counter

from contracts import metrics, transitions
from contracts.consumer import DeadLetter, RetryLater, ShuttingDown
from contracts.db import transaction, until_recorded
from contracts.messages import DeliveryRequested
from push_sender import payload, transport, webpush
from push_sender import subscriptions as subs
from push_sender.endpoints import EndpointPolicy
from push_sender.vapid import VapidKeys
from push_sender.webpush import Push, Result, Subscription

logger = logging.getLogger(__name__)

DEVICE_OUTCOMES = Counter(
    "notiflow_push_device_outcomes",
    "Answers of push services, one per device and attempt.",
    ["outcome"],
)

CLAIM = transitions.claim_sql(
    "push", "id, user_id, title, message, metadata, priority, attempts"
)

NO_SUBSCRIPTION = "user has no push subscription"
RECORD_RETRY = "push.record_retry"
ALL_GONE = "every push subscription of the user is gone (404/410 or expired)"


class PushWorker:
    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        client: Callable[[], httpx.AsyncClient],
        vapid: VapidKeys,
        *,
        ttl: int,
        timeout: float,
        retry_delays: tuple[int, ...],
        lease_seconds: float,
        endpoints: EndpointPolicy,
        max_subscriptions: int,
        connections: int | None = None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        """``connections``: the HTTP client's pool (by default the transport's,
        :data:`transport.POOL_CONNECTIONS`). Deliveries are claimed and
        pushed at most ``connections // max_subscriptions`` at a time, so that
        every push has a connection the moment it starts: its timeout counts no
        wait for one. A push that had waited for a connection within
        its timeout could be answered after it and sent again. ``stopping`` says
        the service is stopping: a delivery that waited for its turn till then is
        given back unclaimed, rather than claimed when the drain may not leave
        time to push it."""
        self._pool = pool
        self._client = client
        self._vapid = vapid
        self._ttl = ttl
        self._timeout = timeout
        self._delays = retry_delays
        self._lease = lease_seconds
        self._endpoints = endpoints
        self._max_subscriptions = max_subscriptions
        if connections is None:
            connections = transport.POOL_CONNECTIONS
        self._slots = asyncio.Semaphore(max(1, connections // max_subscriptions))
        self._stopping = stopping

    async def __call__(
        self, delivery: DeliveryRequested, _raw: AbstractIncomingMessage
    ) -> None:
        # Waited for before the claim, so that the wait takes nothing of the lease.
        async with self._slots:
            if self._stopping():
                raise ShuttingDown
            await self._handle(delivery)

    async def _handle(self, delivery: DeliveryRequested) -> None:
        # Before the claim: the lease it takes ends no sooner than this.
        lease_ends = time.monotonic() + self._lease
        async with transaction(self._pool()) as conn:
            row = await transitions.claim(
                conn,
                CLAIM,
                delivery.notification_id,
                self._lease,
                self._delays,
                log=logger,
                action="push.skipped_duplicate",
                channel_type="push",
            )
            if row is None:
                return
            devices = await conn.fetch(
                subs.FOR_USER, row["user_id"], self._max_subscriptions
            )

        started = time.perf_counter()
        if not devices:
            await self._mark(lease_ends, transitions.SKIPPED, row, {}, NO_SUBSCRIPTION)
            metrics.settled("push", delivery.channel, "skipped")
            logger.info("no subscription", extra={"action": "push.skipped"})
            return

        push = self._push(row)
        pairs = await asyncio.gather(
            *(self._deliver(Subscription(**dict(d)), row, push) for d in devices)
        )
        await self._record(delivery, row, pairs, started, lease_ends)

    def _push(self, row: asyncpg.Record, limit: int = payload.MAX_PLAINTEXT) -> Push:
        metadata: dict[str, Any] = row["metadata"] or {}
        return Push(
            payload=payload.build(
                title=row["title"],
                body=row["message"],
                url=str(metadata.get("url") or ""),
                notification_id=row["id"],
                limit=limit,
            ),
            ttl=self._ttl,
            urgency=payload.urgency(row["priority"]),
            topic=payload.topic(metadata.get("post_id")),
        )

    async def _deliver(
        self, device: Subscription, row: asyncpg.Record, push: Push
    ) -> tuple[Subscription, Result]:
        if device.expires_at is not None and device.expires_at <= datetime.now(UTC):
            # Its push service would answer 404/410: the same end, without asking.
            async with transaction(self._pool()) as conn:
                await conn.execute(subs.DELETE_EXPIRED, device.id)
            DEVICE_OUTCOMES.labels("gone").inc()
            expired = f"expired at {device.expires_at.isoformat()}"
            return device, Result("gone", None, expired)
        # The text is checked here (the allow-list may have changed since the
        # browser subscribed); the addresses are checked by the client's transport
        # on connecting.
        problem = self._endpoints.problem(device.endpoint)
        if problem:
            result = Result("rejected", None, f"endpoint {problem}")
        else:
            client = self._client()
            result = await webpush.send(
                client, device, push, self._vapid, self._timeout
            )
            if result.outcome == "too_large":
                smaller = self._push(row, payload.FALLBACK_PLAINTEXT)
                result = await webpush.send(
                    client, device, smaller, self._vapid, self._timeout
                )
                if result.outcome == "too_large":
                    result = Result("rejected", 413, "too large even when shortened")
        if result.outcome == "gone":
            async with transaction(self._pool()) as conn:
                await conn.execute(subs.DELETE_GONE, device.id, device.endpoint)
        DEVICE_OUTCOMES.labels(result.outcome).inc()
        return device, result

    async def _record(
        self,
        delivery: DeliveryRequested,
        row: asyncpg.Record,
        pairs: Sequence[tuple[Subscription, Result]],
        started: float,
        lease_ends: float,
    ) -> None:
        """Record what the devices answered. They have been told, so while the
        database is away this waits for it, within the row's lease: a row left
        ``sending`` past its lease is handed out again, and pushed a second time."""
        attempt: int = row["attempts"]
        at = datetime.now(UTC).isoformat()
        outcomes = {
            str(device.id): {
                "outcome": result.outcome,
                "status": result.status,
                "detail": result.detail,
                "attempt": attempt,
                "at": at,
            }
            for device, result in pairs
        }
        results = [result for _, result in pairs]
        accepted = [device.id for device, result in pairs if result.outcome == "sent"]

        if accepted:

            async def record_sent() -> None:
                async with transaction(self._pool()) as conn:
                    await conn.execute(subs.TOUCH, accepted)
                    await transitions.settle(
                        conn, transitions.SENT, row["id"], _devices(row, outcomes)
                    )

            await until_recorded(
                record_sent, lease_ends, what="record a sent push", action=RECORD_RETRY
            )
            metrics.delivered("push", delivery.channel, delivery.event_occurred_at)
            logger.info(
                "pushed to %d of %d devices in %.1f ms (attempt %d)",
                len(accepted),
                len(pairs),
                (time.perf_counter() - started) * 1000,
                attempt,
                extra={"action": "push.sent"},
            )
            return

        later = [r for r in results if r.outcome == "retry"]
        if later:
            reason = "; ".join(sorted({r.detail for r in later}))
            if attempt > len(self._delays):
                reason = f"gave up after {attempt} attempts: {reason}"
                await self._mark(lease_ends, transitions.FAILED, row, outcomes, reason)
                metrics.settled("push", delivery.channel, "failed")
                raise DeadLetter(reason, row_failed=True)
            wait = max(
                float(self._delays[attempt - 1]),
                *(r.retry_after or 0.0 for r in later),
            )
            # The message comes back after the retry queue's delay, the shortest
            # not shorter than the wait: the row is due then, not sooner, or the
            # sweeper would take it for a delivery whose message was lost. A wait
            # past the longest delay parks the message until the row is due.
            level = transitions.retry_level(self._delays, wait)
            due = max(wait, float(level))
            await self._mark(
                lease_ends, transitions.RETRYING, row, outcomes, reason, due
            )
            metrics.settled("push", delivery.channel, "retried")
            raise RetryLater(reason, level)

        if all(r.outcome == "gone" for r in results):
            await self._mark(lease_ends, transitions.SKIPPED, row, outcomes, ALL_GONE)
            metrics.settled("push", delivery.channel, "skipped")
            logger.info(ALL_GONE, extra={"action": "push.skipped"})
            return

        reason = "; ".join(sorted({r.detail for r in results if r.outcome != "gone"}))
        await self._mark(
            lease_ends, transitions.FAILED, row, outcomes, f"rejected: {reason}"
        )
        metrics.settled("push", delivery.channel, "failed")
        raise DeadLetter(f"every device refused the push: {reason}", row_failed=True)

    async def _mark(
        self,
        lease_ends: float,
        statement: str,
        row: asyncpg.Record,
        outcomes: dict[str, Any],
        *args: object,
    ) -> None:
        async def settle() -> None:
            async with transaction(self._pool()) as conn:
                await transitions.settle(
                    conn, statement, row["id"], _devices(row, outcomes), *args
                )

        await until_recorded(
            settle, lease_ends, what="record a push's outcome", action=RECORD_RETRY
        )


def _devices(row: asyncpg.Record, outcomes: dict[str, Any]) -> dict[str, Any]:
    """The metadata patch: per-device outcomes under ``push``, by subscription id.

    A later attempt overwrites what an earlier one said about the same device. The
    row is claimed, so its metadata cannot change under us meanwhile.
    """
    earlier = (row["metadata"] or {}).get("push") or {}
    return {"push": {**earlier, **outcomes}}
