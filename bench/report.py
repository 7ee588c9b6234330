"""Turning raw measurements into step summaries, a verdict and the report.

Everything here is a pure function of plain data, so the smoke test in
``tests/bench`` can run it on a few synthetic numbers without any service.

A step is *stable* when the platform kept up with the offered load for the whole
step: nearly every comment was accepted, nearly every delivery arrived before the
drain gave up, the end-to-end backlog did not grow steadily, and the p99 latency
stayed under a ceiling. The sustained rate is the best stable step; latency is
reported from a separate step at half of it, where a healthy system has headroom.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RECIPIENTS = 3  # per comment, each by email and live
DELIVERIES_PER_COMMENT = RECIPIENTS * 2

# What a step must achieve to count as sustained.
MIN_ACCEPTED_SHARE = 0.95
MIN_DELIVERED_SHARE = 0.99
# Backlog growth, as a share of the offered delivery rate, that counts as "steady".
MAX_BACKLOG_GROWTH_SHARE = 0.05
# A backlog smaller than this many seconds of work never counts as growing.
BACKLOG_GRACE_SECONDS = 1.0

# The stages of bench/stages.py, in the order a comment passes them, as the report
# names them. "Began" is PostgreSQL's now(): a transaction's start.
STAGE_LABELS = {
    "due_to_stored": "due → comment transaction began",
    "stored_to_dispatched": "→ dispatcher transaction began",
    "dispatched_to_inbox": "→ gateway's inbox transaction began",
    "inbox_to_stream": "→ event read from the stream",
    "due_to_stream": "due → event, the same rows",
    "dispatched_to_email_sent": "email: dispatcher → sender marks it sent",
}

TARGETS = {
    "sustained_comments_per_s": 500,
    "deliveries_per_s": 3000,
    "sse_p50_ms_at_half_rate": 10,
    "sse_p99_ms_at_half_rate": 50,
    "deliveries_share_of_broker_baseline": 0.5,
}


def percentiles(samples_ms: Sequence[float]) -> dict[str, float | None]:
    """p50, p95, p99 and max by the nearest-rank method; None when empty."""
    if not samples_ms:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(samples_ms)

    def rank(q: float) -> float:
        index = max(0, math.ceil(q * len(ordered)) - 1)
        return round(ordered[index], 2)

    return {
        "count": len(ordered),
        "p50": rank(0.50),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "max": round(ordered[-1], 2),
    }


def growth_per_s(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) samples; 0 for fewer than 3."""
    if len(samples) < 3:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in samples)
    return cov / var


@dataclass
class StepData:
    """What one step measured, before any judgement."""

    rate: float
    duration: float
    scheduled: int
    accepted: int
    errors: int
    skipped: int  # not sent: too many requests already in flight
    post_ms: list[float]
    sse_ms: list[float]
    email_ms: list[float]
    delivered_in_window: int  # deliveries that arrived during the load window
    # (seconds since step start, deliveries owed but not yet arrived)
    backlog: list[tuple[float, float]] = field(default_factory=list)
    # queue name -> (seconds since step start, depth) samples
    queues: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    drain_seconds: float = 0.0
    purpose: str = "ramp"  # "ramp" or "half"


def summarise(step: StepData, max_p99_ms: float) -> dict[str, Any]:
    """The figures and the verdict of one step."""
    expected = step.accepted * RECIPIENTS  # per channel
    sse = percentiles(step.sse_ms)
    email = percentiles(step.email_ms)
    post = percentiles(step.post_ms)
    offered_deliveries = step.rate * DELIVERIES_PER_COMMENT

    # Only the second half of the window: the first seconds fill the pipeline.
    late = [s for s in step.backlog if s[0] >= step.duration / 2]
    growth = growth_per_s(late)
    end_backlog = step.backlog[-1][1] if step.backlog else 0.0

    reasons = []
    if step.scheduled and step.accepted < MIN_ACCEPTED_SHARE * step.scheduled:
        reasons.append(
            f"only {step.accepted} of {step.scheduled} comments accepted "
            f"({step.errors} errors, {step.skipped} not sent)"
        )
    for name, got in (("sse", sse["count"]), ("email", email["count"])):
        if expected and got < MIN_DELIVERED_SHARE * expected:
            reasons.append(f"{name}: {got} of {expected} deliveries arrived")
    if (
        growth > MAX_BACKLOG_GROWTH_SHARE * offered_deliveries
        and end_backlog > BACKLOG_GRACE_SECONDS * offered_deliveries
    ):
        reasons.append(
            f"backlog grew {growth:.0f} deliveries/s to {end_backlog:.0f} at the end"
        )
    for name, stats in (("sse", sse), ("email", email)):
        if stats["p99"] is not None and stats["p99"] > max_p99_ms:
            reasons.append(f"{name} p99 {stats['p99']:.0f} ms > {max_p99_ms:.0f} ms")

    duration = step.duration or 1.0
    cpu_per_comment = {
        name: round(ms / step.accepted, 3) if step.accepted else None
        for name, ms in step.cpu_ms.items()
    }
    return {
        "purpose": step.purpose,
        "rate": step.rate,
        "duration_s": step.duration,
        "comments_scheduled": step.scheduled,
        "comments_accepted": step.accepted,
        "comment_errors": step.errors,
        "comments_not_sent": step.skipped,
        "comments_per_s": round(step.accepted / duration, 1),
        "deliveries_expected": expected * 2,
        "deliveries_per_s": round(step.delivered_in_window / duration, 1),
        "post_latency_ms": post,
        "sse_latency_ms": sse,
        "email_latency_ms": email,
        "backlog_growth_per_s": round(growth, 1),
        "backlog_at_end": end_backlog,
        "queue_depth_max": {
            name: max((v for _, v in samples), default=0)
            for name, samples in step.queues.items()
        },
        "queue_depth_end": {
            name: (samples[-1][1] if samples else 0)
            for name, samples in step.queues.items()
        },
        "drain_s": round(step.drain_seconds, 2),
        "cpu_ms_per_comment": cpu_per_comment,
        "stable": not reasons,
        "unstable_because": reasons,
    }


def sustained(steps: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The stable ramp step with the highest throughput, if any."""
    stable = [s for s in steps if s["purpose"] == "ramp" and s["stable"]]
    return max(stable, key=lambda s: s["comments_per_s"], default=None)


def half_rate(steps: Sequence[Mapping[str, Any]], rates: Sequence[float]) -> float:
    """The rate to measure latency at: half the sustained rate (at least 1/s)."""
    best = sustained(steps)
    base = best["rate"] if best else min(rates)
    return max(1.0, round(base / 2, 1))


def build(
    steps: Sequence[Mapping[str, Any]],
    baselines: Mapping[str, float | None],
    machine: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The whole report, shaped as bench/results/latest.json."""
    best = sustained(steps)
    half = next((s for s in steps if s["purpose"] == "half"), None)
    empty = percentiles([])
    measured = half or {}
    deliveries = best["deliveries_per_s"] if best else 0.0
    report: dict[str, Any] = {
        "sustained_comments_per_s": best["comments_per_s"] if best else 0.0,
        "sustained_at_rate": best["rate"] if best else None,
        "deliveries_per_s": deliveries,
        "latency_measured_at_rate": measured.get("rate"),
        "sse_latency_ms": _latency(measured.get("sse_latency_ms", empty)),
        "email_latency_ms": _latency(measured.get("email_latency_ms", empty)),
        "post_latency_ms": _latency(measured.get("post_latency_ms", empty)),
        "stages_ms": measured.get("stages_ms", {}),
        "cpu_ms_per_comment": (best or measured).get("cpu_ms_per_comment", {}),
        "cpu_measured_at_rate": (best or measured).get("rate"),
        "postgres_cpu_ms_per_comment_by_client": (best or measured).get(
            "postgres_cpu_ms_per_comment_by_client", {}
        ),
        "baselines": dict(baselines),
        "ratios": ratios(best, deliveries, baselines),
        "targets": TARGETS,
        "machine": dict(machine),
        "settings": dict(settings),
        "steps": list(steps),
    }
    report["verdict"] = verdict(report)
    return report


def _latency(stats: Mapping[str, Any]) -> dict[str, Any]:
    return {key: stats.get(key) for key in ("p50", "p95", "p99", "max", "count")}


def ratios(
    best: Mapping[str, Any] | None,
    deliveries_per_s: float,
    baselines: Mapping[str, float | None],
) -> dict[str, float | None]:
    """The pipeline's figures against what the machine does with nothing on top."""

    def share(value: float, base: float | None) -> float | None:
        return round(value / base, 4) if base else None

    comments = best["comments_per_s"] if best else 0.0
    return {
        # One comment is one HTTP request; one delivery is at least one publish and
        # one consume; one comment costs about eight row writes (DESIGN.md).
        "comments_vs_asgi_requests": share(
            comments, baselines.get("asgi_requests_per_s")
        ),
        "deliveries_vs_broker_msgs": share(
            deliveries_per_s, baselines.get("broker_msgs_per_s")
        ),
        "comment_commits_vs_pg_commits": share(
            comments * 8, baselines.get("pg_commits_per_s")
        ),
    }


def verdict(report: Mapping[str, Any]) -> dict[str, bool | None]:
    """Each target and whether this run met it (None: not measured)."""
    sse = report["sse_latency_ms"]
    share = report["ratios"]["deliveries_vs_broker_msgs"]
    return {
        "sustained >= 500 comments/s": report["sustained_comments_per_s"] >= 500,
        "deliveries >= 3000/s": report["deliveries_per_s"] >= 3000,
        "sse p50 < 10 ms at half rate": None if sse["p50"] is None else sse["p50"] < 10,
        "sse p99 < 50 ms at half rate": None if sse["p99"] is None else sse["p99"] < 50,
        "deliveries >= half the broker baseline": None
        if share is None
        else share >= 0.5,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _num(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:,.0f}{unit}"


def format_text(report: Mapping[str, Any]) -> str:
    """A report a person reads in a terminal."""
    lines = []
    machine = report["machine"]
    lines.append(
        f"notiflow bench on {machine.get('cores')} cores, "
        f"{machine.get('memory_gib')} GiB, PostgreSQL {machine.get('postgresql')}, "
        f"RabbitMQ {machine.get('rabbitmq')}, Python {machine.get('python')}"
    )
    if machine.get("postgresql_autovacuum") == "off":
        lines.append(
            "PostgreSQL's autovacuum is off here: the bench vacuums the platform's "
            "tables before each step"
        )
    lines.append("")
    header = (
        f"{'step':>6} {'rate':>6} {'acc/s':>7} {'deliv/s':>8} "
        f"{'sse p50':>8} {'p99':>8} {'email p50':>10} {'p99':>8} "
        f"{'backlog':>8}  verdict"
    )
    lines.append(header)
    for s in report["steps"]:
        note = "stable" if s["stable"] else "; ".join(s["unstable_because"])
        sse, email = s["sse_latency_ms"], s["email_latency_ms"]
        lines.append(
            f"{s['purpose']:>6} {s['rate']:>6g} {s['comments_per_s']:>7.1f} "
            f"{s['deliveries_per_s']:>8.1f} "
            f"{_ms(sse['p50']):>8} {_ms(sse['p99']):>8} "
            f"{_ms(email['p50']):>10} {_ms(email['p99']):>8} "
            f"{s['backlog_at_end']:>8.0f}  {note}"
        )
    lines.append("")
    lines.append(
        f"sustained: {report['sustained_comments_per_s']:.1f} comments/s, "
        f"{report['deliveries_per_s']:.1f} deliveries/s"
    )
    at = report["latency_measured_at_rate"]
    for name in ("sse", "email", "post"):
        stats = report[f"{name}_latency_ms"]
        lines.append(
            f"{name:>5} latency at {at} comments/s: p50 {_ms(stats['p50'])} ms, "
            f"p95 {_ms(stats['p95'])} ms, p99 {_ms(stats['p99'])} ms, "
            f"max {_ms(stats['max'])} ms"
        )
    half = next((s for s in report["steps"] if s["purpose"] == "half"), {})
    lines += _stages_text(report.get("stages_ms") or {}, at, half.get("clock_drift_ms"))
    lines.append("")
    lines.append(f"CPU ms per comment (step at {report['cpu_measured_at_rate']}/s):")
    for name, value in sorted(report["cpu_ms_per_comment"].items()):
        lines.append(f"  {name:<14} {_ms(value):>8}")
    by_client = report.get("postgres_cpu_ms_per_comment_by_client") or {}
    if by_client:
        lines.append("  postgres, by the client its backends serve:")
        for name, value in sorted(by_client.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {name:<30} {_ms(value):>6}")
    b = report["baselines"]
    r = report["ratios"]
    lines.append("")
    lines.append("baselines on this machine, and the pipeline as a share of them:")
    lines.append(
        f"  broker publish+consume  {_num(b.get('broker_msgs_per_s'), ' msg/s'):>14}"
        f"   deliveries/s is {_share(r['deliveries_vs_broker_msgs'])}"
    )
    lines.append(
        f"  asyncpg commits (20 c.) {_num(b.get('pg_commits_per_s'), ' /s'):>14}"
        f"   8 writes/comment use {_share(r['comment_commits_vs_pg_commits'])}"
    )
    lines.append(
        f"  bare ASGI (uvicorn)     {_num(b.get('asgi_requests_per_s'), ' req/s'):>14}"
        f"   comments/s is {_share(r['comments_vs_asgi_requests'])}"
    )
    lines.append(f"  LISTEN/NOTIFY rtt p50   {_num(b.get('notify_rtt_us'), ' µs'):>14}")
    lines.append("")
    lines.append("targets:")
    for name, met in report["verdict"].items():
        mark = "n/a" if met is None else ("met" if met else "NOT met")
        lines.append(f"  {name:<42} {mark}")
    return "\n".join(lines)


def _stages_text(
    found: Mapping[str, Mapping[str, Any]], at: object, drift_ms: float | None
) -> list[str]:
    """The stage breakdown of the half-rate step, in the order a comment goes."""
    if not found:
        return []
    lines = [
        "",
        f"where POST → SSE time goes at {at} comments/s, p50 / p95 ms (count); "
        f"clocks drifted {'-' if drift_ms is None else f'{drift_ms:.3f}'} ms "
        "during the step:",
    ]
    for key, label in STAGE_LABELS.items():
        stats = found.get(key, {})
        lines.append(
            f"  {label:<42} {_ms(stats.get('p50')):>8} / {_ms(stats.get('p95')):>8}"
            f"   ({stats.get('count', 0)})"
        )
    return lines


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%} of it"
