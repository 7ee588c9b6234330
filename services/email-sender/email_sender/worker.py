"""Email deliveries, a batch at a time: claim the rows, send, record the outcomes.

The row's status decides everything, through the transitions of
:mod:`contracts.transitions`: a worker first claims the row (``pending``, ``retrying``
once due, or ``sending`` whose lease ran out because the worker holding it died); a
row already ``sent``, ``failed`` or ``skipped`` is left alone and the message acked,
so a redelivered message never sends a second email.

The consumer hands over whatever deliveries are waiting, and a batch costs two
statements whatever its size: one claims every row it can, one records every email
the server took. Rows that could not be claimed are explained with one more, and
failures, which are rare, with one per kind. The emails are sent concurrently, each
on its own connection from the SMTP pool and in its own message's context, so that
what is logged on its way carries that message's ids and trace.

Between sending and recording, the outcome lives only in this process. If the
database goes away just then, the consumer runs the batch again once it is back;
its rows are found ``sending`` under a live lease and their messages acked, and
the lease sweeper hands them out again once the lease has run out. Those emails go
out a second time, with the same ``Message-ID``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from contracts import metrics, transitions
from contracts.consumer import DeadLetter, Item, RetryLater
from contracts.db import connection
from contracts.messages import DeliveryRequested
from email_sender import mime, smtp

logger = logging.getLogger(__name__)

_CLAIM_ROWS = transitions.claim_many_sql(
    "email", "id, user_id, email, title, message, metadata, attempts"
)
# The recipients' display names come with the claim, for the To header.
CLAIM = f"""
WITH claimed AS ({_CLAIM_ROWS})
SELECT c.*, u.display_name FROM claimed c JOIN users u ON u.id = c.user_id
"""

SKIPPED_ACTION = "email.skipped_duplicate"

Outcome = Exception | None


@dataclass(eq=False)
class _Claimed:
    """A claimed row and the message that asked for it."""

    index: int
    item: Item[DeliveryRequested]
    row: asyncpg.Record


class EmailWorker:
    """A batch handler for :meth:`contracts.runtime.Runtime.subscribe_batch`."""

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

    async def __call__(self, items: Sequence[Item[DeliveryRequested]]) -> list[Outcome]:
        outcomes: list[Outcome] = [None] * len(items)
        claimed = await self._claim(items, outcomes)
        if not claimed:
            return outcomes

        # Each task starts from a copy of its own message's context.
        tasks = [
            c.item.within(asyncio.create_task, self._deliver(c.row)) for c in claimed
        ]
        results = await asyncio.gather(*tasks, return_exceptions=True)

        sent: list[tuple[_Claimed, float]] = []
        failures: list[tuple[_Claimed, str, tuple[object, ...]]] = []
        for c, result in zip(claimed, results, strict=True):
            if isinstance(result, float):
                sent.append((c, result))
            elif isinstance(result, mime.InvalidAddress | smtp.SendFailed):
                outcome, statement, args = self._failure(c.row, result)
                outcomes[c.index] = outcome
                failures.append((c, statement, args))
            elif isinstance(result, Exception):
                # A bug, as it would be in a handler of one message: the message is
                # dead-lettered with the error, and the row left to its lease.
                outcomes[c.index] = result
            else:
                raise result

        await self._record([c.row["id"] for c, _ in sent], failures)

        for c, elapsed in sent:
            message = c.item.message
            metrics.delivered("email", message.channel, message.event_occurred_at)
            c.item.within(
                logger.info,
                "email sent in %.1f ms (attempt %d)",
                elapsed,
                c.row["attempts"],
                extra={"action": "email.sent", "batch": len(items)},
            )
        for c, statement, _ in failures:
            status = "retried" if statement == transitions.RETRYING else "failed"
            metrics.settled("email", c.item.message.channel, status)
        return outcomes

    async def _claim(
        self, items: Sequence[Item[DeliveryRequested]], outcomes: list[Outcome]
    ) -> list[_Claimed]:
        """Claim the rows of ``items``; fill in ``outcomes`` for those not claimed."""
        ids = [item.message.notification_id for item in items]
        async with connection(self._pool()) as conn:
            rows = {row["id"]: row for row in await conn.fetch(CLAIM, ids, self._lease)}
            claimed: list[_Claimed] = []
            unclaimed: list[int] = []
            current: dict[int, asyncpg.Record] = {}
            for index, item in enumerate(items):
                # pop: a message delivered twice in one batch claims its row once;
                # the second copy finds it ``sending`` and is done.
                row = rows.pop(ids[index], None)
                if row is None:
                    unclaimed.append(index)
                else:
                    claimed.append(_Claimed(index, item, row))
            if unclaimed:
                current = await transitions.statuses(
                    conn, [ids[index] for index in unclaimed]
                )
        for index in unclaimed:
            outcomes[index] = items[index].within(
                transitions.unclaimed,
                ids[index],
                current.get(ids[index]),
                self._delays,
                log=logger,
                action=SKIPPED_ACTION,
            )
        return claimed

    async def _deliver(self, row: asyncpg.Record) -> float:
        """Build and send the email of ``row``; return how long it took, in ms."""
        started = time.perf_counter()
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
        return (time.perf_counter() - started) * 1000

    def _failure(
        self, row: asyncpg.Record, exc: mime.InvalidAddress | smtp.SendFailed
    ) -> tuple[DeadLetter | RetryLater, str, tuple[object, ...]]:
        """What a failed email means: its message's outcome, its row's transition."""
        if not isinstance(exc, smtp.TransientSendError):
            reason = str(exc)
            failed = DeadLetter(f"permanent failure: {reason}")
            return failed, transitions.FAILED, (reason,)
        attempt = row["attempts"]
        if attempt > len(self._delays):
            reason = f"gave up after {attempt} attempts: {exc.reason}"
            return DeadLetter(reason), transitions.FAILED, (reason,)
        delay = self._delays[attempt - 1]
        retry = RetryLater(exc.reason, delay)
        return retry, transitions.RETRYING, (exc.reason, float(delay))

    async def _record(
        self,
        sent: list[int],
        failures: list[tuple[_Claimed, str, tuple[object, ...]]],
    ) -> None:
        """Store every outcome; each statement commits on its own."""
        if not (sent or failures):
            return
        async with connection(self._pool()) as conn:
            if sent:
                await conn.execute(transitions.SENT_MANY, sent)
            for statement in (transitions.FAILED, transitions.RETRYING):
                rows = [
                    (c.row["id"], {}, *args)
                    for c, chosen, args in failures
                    if chosen == statement
                ]
                if rows:
                    await conn.executemany(statement, rows)
