"""Prometheus metrics every service exposes on ``/metrics``, defined once.

The SSE gateway defines its own connection metrics beside its hub. Names and labels
are part of the operator interface: alert rules and the Grafana
dashboard under ``deploy/`` refer to them, so change them only together.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import Counter, Gauge, Histogram

NOTIFICATIONS = Counter(
    "notiflow_notifications",
    "Notification rows by outcome: created, sent, failed, skipped, retried.",
    ["type", "channel", "status"],
)

DELIVERY_LATENCY = Histogram(
    "notiflow_delivery_latency_seconds",
    "Time from the event's creation to the notification being sent.",
    ["type"],
    buckets=(
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1,
        2.5,
        5,
        10,
        30,
        60,
        300,
        900,
        3600,
    ),
)

DEAD_LETTERS = Counter(
    "notiflow_dead_letters",
    "Messages set aside in the dead-letter queue, by the queue they came from.",
    ["queue"],
)

RETRIES = Counter(
    "notiflow_retries",
    "Messages parked in a delay queue for a later attempt.",
    ["queue"],
)

CONSUMER_IN_FLIGHT = Gauge(
    "notiflow_consumer_in_flight",
    "Messages being handled right now.",
    ["queue"],
)

MESSAGES_HANDLED = Counter(
    "notiflow_messages_handled",
    "Messages taken from a queue, by how they ended.",
    ["queue", "outcome"],
)

BATCH_SIZE = Histogram(
    "notiflow_consumer_batch_size",
    "Messages handled together by one call of a batch handler.",
    ["queue"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200),
)

RECOVERED = Counter(
    "notiflow_deliveries_recovered",
    "Deliveries a sweeper put back on the road: lease_expired (its worker was lost), "
    "republished (pending too long, its message lost), failed (out of attempts).",
    ["how"],
)

OUTBOX_PUBLISHED = Counter(
    "notiflow_outbox_published",
    "Outbox rows published to RabbitMQ and confirmed.",
)

OUTBOX_PUBLISH_FAILURES = Counter(
    "notiflow_outbox_publish_failures",
    "Rounds of this relay's publishing that failed (no confirm in time, a "
    "refusal, the broker away) and are tried again; another relay may publish "
    "the rows meanwhile.",
)

OUTBOX_BACKLOG = Gauge(
    "notiflow_outbox_backlog",
    "Outbox rows waiting to be published, as last seen by this relay.",
)

OUTBOX_OLDEST_AGE = Gauge(
    "notiflow_outbox_oldest_age_seconds",
    "Age of the oldest unpublished outbox row, as last seen by this relay.",
)

CONFIG_REFUSED = Gauge(
    "notiflow_dispatcher_config_refused",
    "1 while the channel configuration on disk is refused and the dispatcher "
    "keeps its last good one; a dispatcher started now would not start.",
)

TEMPLATES_BROKEN = Gauge(
    "notiflow_dispatcher_templates_broken",
    "Template files that are broken on disk, each used in its last version "
    "that rendered.",
)


def delivered(type_: str, channel: str, event_occurred_at: datetime) -> None:
    """Count a notification as sent and record how long it took since the event."""
    NOTIFICATIONS.labels(type_, channel, "sent").inc()
    age = (datetime.now(UTC) - event_occurred_at).total_seconds()
    DELIVERY_LATENCY.labels(type_).observe(max(age, 0.0))


def settled(type_: str, channel: str, status: str) -> None:
    """Count a notification that ended ``failed`` or ``skipped``, or was ``retried``."""
    NOTIFICATIONS.labels(type_, channel, status).inc()
