"""Email deliveries, a batch at a time: claim the rows, send, record the outcomes.

The row's status decides everything, through the transitions of
:mod:`contracts.transitions`: a worker first claims the row (``pending``, ``retrying``
once due, or ``sending`` whose lease ran out because the worker holding it died); a
row already ``sent``, ``failed`` or ``skipped`` is left alone and the message acked,
so a redelivered message never sends a second email.

The consumer hands over whatever deliveries are waiting, and one statement claims
every row of the batch it can; rows that could not be claimed are explained with
one more. The emails are sent concurrently, each on its own connection from the SMTP
pool and in its own message's context, so that what is logged on its way carries
that message's ids and trace. Each delivery is settled as soon as its row is
recorded ``sent`` (:meth:`contracts.consumer.Item.finished`): a batch waiting on
one slow SMTP conversation holds one of the sender's places, not a batch's worth,
and the emails behind it go out meanwhile. A failure, which is rare, is recorded
with a statement of its own as soon as it happens, and its message settled then
(:meth:`contracts.consumer.Item.failed`): its retry's delay runs from the failure,
not from the end of the batch's slowest conversation.

An email the server has taken but whose row is not yet ``sent`` goes out a second
time (with the same ``Message-ID``) if this process dies then: the lease sweeper
hands the row out again. So a row is not kept waiting for the slowest email of its
batch: :class:`SentRecorder` marks it ``sent`` as soon as its email is taken, in one
statement with every other row whose email was taken meanwhile, by any batch.

If the database goes away between sending and recording, the row is recorded once
it is back, tried again and again for as long as the row's lease lasts: the email
has gone, and a row left ``sending`` past its lease is handed out again by the
sweeper and its email sent a second time. Only an outage longer than the lease
(``NOTIFLOW_EMAIL_LEASE_SECONDS``) sends it twice; the batch then runs again once
the database is back, finds its rows ``sending`` under their lease, and acks.

A stopping sender claims nothing more: the deliveries it holds that no batch has
taken go back to the queue with their rows ``pending`` (see
:mod:`contracts.consumer`). A batch still sending when the drain time runs out is
cancelled; its rows stay ``sending`` until the lease runs out, like a dead worker's,
and an email the server had taken is sent twice. So the deployments give the email
sender a drain as long as one whole SMTP conversation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from contracts import metrics, transitions
from contracts.auth import unsubscribe_url
from contracts.consumer import DeadLetter, Item, RetryLater
from contracts.db import (
    UNAVAILABLE_ERRORS,
    DatabaseUnavailable,
    connection,
    until_recorded,
)
from contracts.messages import DeliveryRequested
from email_sender import mime, smtp

logger = logging.getLogger(__name__)

_CLAIM_ROWS = transitions.claim_many_sql(
    "email", "id, user_id, email, title, message, metadata, attempts"
)
# The recipients' display names come with the claim, for the To header. Rows the
# claim skipped (their user turned email off) come back too, to be told apart.
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


class SentRecorder:
    """Marks rows ``sent`` in as few statements as keep each one waiting briefly.

    A row whose email was taken while a statement ran goes into the next one, so
    under load one statement records many rows, and when idle a row is recorded at
    once on its own.
    """

    def __init__(self, pool: Callable[[], asyncpg.Pool]) -> None:
        self._pool = pool
        self._lock = asyncio.Lock()
        # Insertion-ordered: the rows waiting for the next statement.
        self._pending: dict[int, None] = {}
        self._failed: dict[int, BaseException] = {}

    async def record(self, notification_id: int) -> None:
        """Return once the row is ``sent``; raise what the statement raised."""
        self._pending[notification_id] = None
        async with self._lock:
            if (error := self._failed.pop(notification_id, None)) is not None:
                raise _again(error)
            if notification_id not in self._pending:
                return  # the statement that ran meanwhile took it
            ids = list(self._pending)
            self._pending.clear()
            try:
                async with connection(self._pool()) as conn:
                    await conn.execute(transitions.SENT_MANY, ids)
            except Exception as exc:
                # The others waiting on this statement learn of it without trying
                # again, each for as long as acquiring a connection may take.
                self._failed.update(
                    (other, exc) for other in ids if other != notification_id
                )
                raise
            except BaseException:
                # Cancelled: the others try for themselves.
                self._pending.update(dict.fromkeys(ids))
                self._pending.pop(notification_id, None)
                raise


def _again(error: BaseException) -> Exception:
    """The error a row learns of when the statement that took it failed."""
    if isinstance(error, (DatabaseUnavailable, *UNAVAILABLE_ERRORS)):
        return DatabaseUnavailable(f"recording sent rows failed: {error!r}")
    return RuntimeError(f"recording sent rows failed: {error!r}")


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
        public_url: str,
        secret_key: str,
        retry_delays: tuple[int, ...],
        lease_seconds: float,
    ) -> None:
        """``public_url`` and ``secret_key`` make each recipient's unsubscribe
        link, the same the dispatcher puts at the end of the email."""
        self._pool = pool
        self._smtp = transport
        self._sent = SentRecorder(pool)
        self._sender = sender
        self._sender_name = sender_name
        self._domain = domain
        self._public_url = public_url
        self._secret_key = secret_key
        self._delays = retry_delays
        self._lease = lease_seconds

    async def __call__(self, items: Sequence[Item[DeliveryRequested]]) -> list[Outcome]:
        outcomes: list[Outcome] = [None] * len(items)
        # Before the claim: the leases it takes end no sooner than this.
        lease_ends = time.monotonic() + self._lease
        claimed = await self._claim(items, outcomes)
        if not claimed:
            return outcomes

        # Each task starts from a copy of its own message's context.
        tasks = [
            c.item.within(asyncio.create_task, self._send(c, len(items), lease_ends))
            for c in claimed
        ]
        results = await asyncio.gather(*tasks, return_exceptions=True)

        unavailable: BaseException | None = None
        for c, result in zip(claimed, results, strict=True):
            if result is None:
                continue
            if isinstance(result, (DatabaseUnavailable, *UNAVAILABLE_ERRORS)):
                unavailable = result
            elif isinstance(result, Exception):
                # A bug, as it would be in a handler of one message: the message is
                # dead-lettered with the error, and the row left to its lease.
                outcomes[c.index] = result
            else:
                raise result
        if unavailable is not None:
            # The whole batch waits for the database and runs again.
            raise unavailable
        return outcomes

    async def _send(self, claimed: _Claimed, batch: int, lease_ends: float) -> None:
        """Deliver a claimed row; if its email fails, record that and settle its
        message at once, so that its retry waits its delay from now, not from
        when the batch's slowest conversation ends."""
        try:
            await self._deliver(claimed, batch, lease_ends)
        except smtp.TooLate as exc:
            # The row may be sent by another sender by now: it is not touched,
            # and its message is done with.
            logger.warning(
                "email not sent: %s; the row is left to its lease",
                exc,
                extra={"action": "email.lease_ran_out", "batch": batch},
            )
            claimed.item.finished()
        except smtp.NoConnection as exc:
            # Not an attempt: the email waited for a connection of the few the
            # server allows, and goes again after the first delay.
            logger.info(
                "email not tried: %s",
                exc.reason,
                extra={"action": "email.waited", "batch": batch},
            )
            delay = self._delays[0]
            await self._record_failure(
                claimed.row["id"], transitions.UNTRIED, (exc.reason, float(delay))
            )
            metrics.settled("email", claimed.item.message.channel, "retried")
            claimed.item.failed(RetryLater(exc.reason, delay))
        except (mime.InvalidAddress, smtp.SendFailed) as exc:
            outcome, statement, args = self._failure(claimed.row, exc)
            await self._record_failure(claimed.row["id"], statement, args)
            metrics.settled(
                "email",
                claimed.item.message.channel,
                "retried" if statement == transitions.RETRYING else "failed",
            )
            claimed.item.failed(outcome)

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
                # A row the claim skipped (email turned off) is told so below.
                if row is None or row["status"] != "sending":
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
                channel_type="email",
            )
        return claimed

    async def _deliver(self, claimed: _Claimed, batch: int, lease_ends: float) -> None:
        """Build and send the email of a claimed row, and record it ``sent``.

        Runs in the context of the row's message: its log line carries its ids.
        """
        started = time.perf_counter()
        row = claimed.row
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
            unsubscribe_url=unsubscribe_url(
                self._public_url, row["user_id"], self._secret_key
            ),
        )
        await self._smtp.send(message, ends_by=lease_ends)
        await self._record_sent(row["id"], lease_ends)
        # Recorded: its message need not wait for the slowest email of the batch.
        claimed.item.finished()

        delivery = claimed.item.message
        metrics.delivered("email", delivery.channel, delivery.event_occurred_at)
        logger.info(
            "email sent in %.1f ms (attempt %d)",
            (time.perf_counter() - started) * 1000,
            row["attempts"],
            extra={"action": "email.sent", "batch": batch},
        )

    async def _record_sent(self, notification_id: int, lease_ends: float) -> None:
        """Record a row whose email has gone ``sent``, waiting for the database
        while it is away, until the row's lease is about to run out."""
        await until_recorded(
            lambda: self._sent.record(notification_id),
            lease_ends,
            what="record a sent email",
            action="email.record_retry",
        )

    def _failure(
        self, row: asyncpg.Record, exc: mime.InvalidAddress | smtp.SendFailed
    ) -> tuple[DeadLetter | RetryLater, str, tuple[object, ...]]:
        """What a failed email means: its message's outcome, its row's transition."""
        if not isinstance(exc, smtp.TransientSendError):
            reason = str(exc)
            failed = DeadLetter(f"permanent failure: {reason}", row_failed=True)
            return failed, transitions.FAILED, (reason,)
        attempt = row["attempts"]
        if attempt > len(self._delays):
            reason = f"gave up after {attempt} attempts: {exc.reason}"
            return (
                DeadLetter(reason, row_failed=True),
                transitions.FAILED,
                (reason,),
            )
        delay = self._delays[attempt - 1]
        retry = RetryLater(exc.reason, delay)
        return retry, transitions.RETRYING, (exc.reason, float(delay))

    async def _record_failure(
        self, notification_id: int, statement: str, args: tuple[object, ...]
    ) -> None:
        """Store a failed row's transition."""
        async with connection(self._pool()) as conn:
            await conn.execute(statement, notification_id, {}, *args)
