"""Stopping the background loops of a service: sweepers, relays, listeners."""

from __future__ import annotations

import asyncio
import logging

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
