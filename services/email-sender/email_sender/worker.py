"""One email delivery: claim the row, send, record the outcome.

The row's status decides everything, through the transitions of
:mod:`contracts.transitions`: a worker first claims the row (``pending``, ``retrying``
once due, or ``sending`` whose lease ran out because the worker holding it died); a
row already ``sent``, ``failed`` or ``skipped`` is left alone and the message acked,
so a redelivered message never sends a second email.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from contracts import metrics, transitions
from contracts.consumer import DeadLetter, RetryLater
from contracts.db import transaction
from contracts.messages import DeliveryRequested
from email_sender import mime, smtp

logger = logging.getLogger(__name__)

_CLAIM_ROW = transitions.claim_sql(
    "email", "id, user_id, email, title, message, metadata, attempts"
)
# The recipient's display name comes with the claim, for the To header.
CLAIM = f"""
WITH claimed AS ({_CLAIM_ROW})
SELECT c.*, u.display_name FROM claimed c JOIN users u ON u.id = c.user_id
"""


class EmailWorker:
    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        transport: smtp.SmtpPool,
        *,
        sender: str,
        sender_name: str,
        domain: str,
        retry_delays: tuple[int, ...],
        lease_seconds: float,
    ) -> None:
        self._pool = pool
        self._smtp = transport
        self._sender = sender
        self._sender_name = sender_name
        self._domain = domain
        self._delays = retry_delays
        self._lease = lease_seconds

    async def __call__(
        self, delivery: DeliveryRequested, _raw: AbstractIncomingMessage
    ) -> None:
        async with transaction(self._pool()) as conn:
            row = await transitions.claim(
                conn,
                CLAIM,
                delivery.notification_id,
                self._lease,
                self._delays,
                log=logger,
                action="email.skipped_duplicate",
            )
        if row is None:
            return

        started = time.perf_counter()
        try:
            message = mime.build(
                notification_id=row["id"],
                to_address=row["email"],
                to_name=row["display_name"],
                subject=row["title"],
                text=row["message"],
                html=(row["metadata"] or {}).get("html"),
                sender=self._sender,
                sender_name=self._sender_name,
                domain=self._domain,
            )
            await self._smtp.send(message)
        except (mime.InvalidAddress, smtp.PermanentSendError) as exc:
            reason = str(exc)
            await self._mark(transitions.FAILED, row["id"], reason)
            metrics.settled("email", delivery.channel, "failed")
            raise DeadLetter(f"permanent failure: {reason}") from exc
        except smtp.TransientSendError as exc:
            attempt = row["attempts"]
            if attempt > len(self._delays):
                reason = f"gave up after {attempt} attempts: {exc.reason}"
                await self._mark(transitions.FAILED, row["id"], reason)
                metrics.settled("email", delivery.channel, "failed")
                raise DeadLetter(reason) from exc
            delay = self._delays[attempt - 1]
            await self._mark(transitions.RETRYING, row["id"], exc.reason, float(delay))
            metrics.settled("email", delivery.channel, "retried")
            raise RetryLater(exc.reason, delay) from exc

        await self._mark(transitions.SENT, row["id"])
        metrics.delivered("email", delivery.channel, delivery.event_occurred_at)
        logger.info(
            "email sent in %.1f ms (attempt %d)",
            (time.perf_counter() - started) * 1000,
            row["attempts"],
            extra={"action": "email.sent"},
        )

    async def _mark(self, statement: str, notification_id: int, *args: object) -> None:
        async with transaction(self._pool()) as conn:
            await transitions.settle(conn, statement, notification_id, None, *args)
