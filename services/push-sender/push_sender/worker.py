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

from contracts import metrics
from contracts.consumer import DeadLetter, RetryLater
from contracts.db import transaction
from contracts.messages import DeliveryRequested
from push_sender import payload, webpush
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

CLAIM = """
UPDATE notifications
SET status = 'sending', attempts = attempts + 1, updated_at = now(),
    lease_expires_at = now() + make_interval(secs => $2)
WHERE id = $1 AND type = 'push'
  AND (status = 'pending'
       OR (status = 'retrying' AND coalesce(next_attempt_at <= now(), true))
       OR (status = 'sending' AND lease_expires_at < now()))
RETURNING id, user_id, title, message, metadata, priority, attempts
"""

STATUS = """
SELECT status,
       greatest(0, extract(epoch FROM next_attempt_at - now()))::float8 AS due_in
FROM notifications WHERE id = $1
"""

# Per-device outcomes go under metadata.push, keyed by subscription id; a later
# attempt overwrites what an earlier one said about the same device.


def _merge(parameter: str) -> str:
    return (
        "metadata = jsonb_set(metadata, '{push}', "
        "coalesce(metadata->'push', '{}') || " + parameter + ")"
    )


MARK_SENT = f"""
UPDATE notifications
SET status = 'sent', sent_at = now(), updated_at = now(), last_error = NULL,
    lease_expires_at = NULL, next_attempt_at = NULL, {_merge("$2::jsonb")}
WHERE id = $1 AND status = 'sending'
"""

MARK_RETRYING = f"""
UPDATE notifications
SET status = 'retrying', last_error = $2, updated_at = now(), lease_expires_at = NULL,
    next_attempt_at = now() + make_interval(secs => $3), {_merge("$4::jsonb")}
WHERE id = $1 AND status = 'sending'
"""

MARK_FAILED = f"""
UPDATE notifications
SET status = 'failed', last_error = $2, updated_at = now(), lease_expires_at = NULL,
    next_attempt_at = NULL, {_merge("$3::jsonb")}
WHERE id = $1 AND status = 'sending'
"""

MARK_SKIPPED = f"""
UPDATE notifications
SET status = 'skipped', last_error = $2, updated_at = now(), lease_expires_at = NULL,
    next_attempt_at = NULL, {_merge("$3::jsonb")}
WHERE id = $1 AND status = 'sending'
"""

NO_SUBSCRIPTION = "user has no push subscription"
ALL_GONE = "every push subscription of the user is gone (404/410)"


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
    ) -> None:
        self._pool = pool
        self._client = client
        self._vapid = vapid
        self._ttl = ttl
        self._timeout = timeout
        self._delays = retry_delays
        self._lease = lease_seconds
        self._endpoints = endpoints

    async def __call__(
        self, delivery: DeliveryRequested, _raw: AbstractIncomingMessage
    ) -> None:
        async with transaction(self._pool()) as conn:
            row = await conn.fetchrow(CLAIM, delivery.notification_id, self._lease)
            if row is None:
                current = await conn.fetchrow(STATUS, delivery.notification_id)
            else:
                devices = await conn.fetch(subs.FOR_USER, row["user_id"])
        if row is None:
            self._unclaimed(delivery.notification_id, current)
            return

        started = time.perf_counter()
        if not devices:
            await self._mark(MARK_SKIPPED, row["id"], NO_SUBSCRIPTION, {})
            metrics.settled("push", delivery.channel, "skipped")
            logger.info("no subscription", extra={"action": "push.skipped"})
            return

        push = self._push(row)
        pairs = await asyncio.gather(
            *(self._deliver(Subscription(**dict(d)), row, push) for d in devices)
        )
        await self._record(delivery, row, pairs, started)

    def _unclaimed(self, notification_id: int, current: asyncpg.Record | None) -> None:
        if current is None:
            raise DeadLetter(f"notification {notification_id} not found")
        if current["status"] == "retrying" and current["due_in"] > 0:
            due_in = float(current["due_in"])
            raise RetryLater(f"not due for {due_in:.1f}s", self._level(due_in))
        logger.info(
            "notification is %s; nothing to send",
            current["status"],
            extra={"action": "push.skipped_duplicate"},
        )

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
    ) -> None:
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
            async with transaction(self._pool()) as conn:
                await conn.execute(subs.TOUCH, accepted)
                await conn.execute(MARK_SENT, row["id"], outcomes)
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
                await self._mark(MARK_FAILED, row["id"], reason, outcomes)
                metrics.settled("push", delivery.channel, "failed")
                raise DeadLetter(reason)
            wait = max(
                float(self._delays[attempt - 1]),
                *(r.retry_after or 0.0 for r in later),
            )
            await self._mark(MARK_RETRYING, row["id"], reason, outcomes, wait)
            metrics.settled("push", delivery.channel, "retried")
            raise RetryLater(reason, self._level(wait))

        if all(r.outcome == "gone" for r in results):
            await self._mark(MARK_SKIPPED, row["id"], ALL_GONE, outcomes)
            metrics.settled("push", delivery.channel, "skipped")
            logger.info(ALL_GONE, extra={"action": "push.skipped"})
            return

        reason = "; ".join(sorted({r.detail for r in results if r.outcome != "gone"}))
        await self._mark(MARK_FAILED, row["id"], f"rejected: {reason}", outcomes)
        metrics.settled("push", delivery.channel, "failed")
        raise DeadLetter(f"every device refused the push: {reason}")

    def _level(self, wait: float) -> int:
        """The shortest retry delay not shorter than ``wait``, else the longest."""
        levels = sorted(self._delays)
        return next((level for level in levels if level >= wait), levels[-1])

    async def _mark(
        self,
        statement: str,
        notification_id: int,
        reason: str,
        outcomes: dict[str, Any],
        wait: float | None = None,
    ) -> None:
        args: tuple[Any, ...] = (notification_id, reason)
        if wait is not None:
            args += (wait,)
        async with transaction(self._pool()) as conn:
            await conn.execute(statement, *args, outcomes)
