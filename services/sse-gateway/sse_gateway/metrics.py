"""Prometheus series of the gateway, served by the shared ``/metrics`` route.

The task gauge counts every asyncio task of the process. An idle stream holds one
task of its own (its disconnect watcher) besides the server's request task, so the
count returning to its baseline after clients leave shows that nothing leaked.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Counter, Gauge

# Alert rules and dashboards under deploy/ refer to these names.
CONNECTIONS = Gauge(
    "notiflow_sse_connections", "Browser streams open on this gateway process."
)
EVENTS_WRITTEN = Counter(
    "notiflow_sse_events_written",
    "Notification events written to browser streams, replayed ones included.",
)


def _tasks() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped outside the event loop
        return 0


TASKS = Gauge("notiflow_sse_asyncio_tasks", "asyncio tasks alive in this process.")
TASKS.set_function(_tasks)
