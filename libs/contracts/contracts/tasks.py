"""Stopping the background loops of a service: sweepers, relays, listeners."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

logger = logging.getLogger(__name__)

# How long a stop waits for a cancelled loop to end.
STOP_SECONDS = 5.0


async def stop_task(
    task: asyncio.Task[object], what: str, timeout: float = STOP_SECONDS
) -> bool:
    """Cancel ``task`` and wait for it to end; return whether it did in ``timeout``.

    A library may turn a cancellation into an error of its own (asyncpg does, when
    the connection of a cancelled statement cannot be given back), and a loop that
    waits out such errors would then run on. Each loop also checks a stopping flag
    of its own; this bound is for whatever no flag catches, so that a stop never
    waits for ever.
    """
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=timeout)
    if not done:
        logger.error(
            "%s did not stop within %gs of being cancelled; leaving it",
            what,
            timeout,
            extra={"action": "task.stuck"},
        )
        return False
    return True


# How long a stop waits for one connection or channel to close.
CLOSE_SECONDS = 3.0


async def bounded(
    step: Awaitable[object], what: str, timeout: float = CLOSE_SECONDS
) -> None:
    """Await ``step``, for at most ``timeout`` seconds; past that, go on without it.

    For closing connections: a broker that stopped answering leaves each close
    waiting for a reply up to the client library's own RPC timeout (a minute in
    aiormq), one after the other, and aio-pika may swallow the cancellation meant
    to end the wait. ``step`` runs as a task of its own, cancelled and left behind
    when the time is up, so that the stop goes on whatever it does.
    """
    task = asyncio.ensure_future(step)
    try:
        done, _ = await asyncio.wait([task], timeout=timeout)
    except BaseException:
        task.cancel()
        raise
    if done:
        task.result()
        return
    task.cancel()
    logger.warning(
        "%s did not finish within %gs; going on without it",
        what,
        timeout,
        extra={"action": "stop.step_timed_out"},
    )
