"""How many messages the consumers took per batch during a step.

Each service exports ``notiflow_consumer_batch_size`` (a histogram per queue) on
``/metrics``. The mean batch of a step is the change in its sum over the change in
its count; a platform the bench did not start has no such addresses, and gets none.
"""

from __future__ import annotations

import re

import httpx

_SAMPLE = re.compile(
    r'^notiflow_consumer_batch_size_(sum|count)\{queue="([^"]+)"\} (\S+)$', re.M
)

Totals = dict[str, tuple[float, float]]


async def totals(metrics_urls: list[str]) -> Totals:
    """Per queue, (sum, count) of the batch-size histogram across the services."""
    found: dict[str, list[float]] = {}
    async with httpx.AsyncClient(timeout=5) as client:
        for url in metrics_urls:
            try:
                text = (await client.get(url)).text
            except httpx.HTTPError:
                continue
            for kind, queue, value in _SAMPLE.findall(text):
                pair = found.setdefault(queue, [0.0, 0.0])
                pair[0 if kind == "sum" else 1] += float(value)
    return {queue: (pair[0], pair[1]) for queue, pair in found.items()}


def means(before: Totals, after: Totals) -> dict[str, float]:
    """Mean messages per batch between two readings, per queue that had any."""
    result: dict[str, float] = {}
    for queue, (total, count) in after.items():
        total0, count0 = before.get(queue, (0.0, 0.0))
        if count > count0:
            result[queue] = round((total - total0) / (count - count0), 2)
    return result
