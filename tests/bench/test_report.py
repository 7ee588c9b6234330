"""The report-building code of ``make bench``, on a tiny synthetic run.

No service runs here: the bench itself is too slow for ``make test``, but the code
that turns its measurements into latest.json, the text report and the chart must
not rot between runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import chart, pyspy, report, stages


def _step(rate: float, purpose: str = "ramp", late_ms: float = 0.0) -> report.StepData:
    accepted = int(rate * 2)
    per_channel = accepted * report.RECIPIENTS
    return report.StepData(
        rate=rate,
        duration=2.0,
        scheduled=accepted,
        accepted=accepted,
        errors=0,
        skipped=0,
        post_ms=[5.0] * accepted,
        sse_ms=[8.0 + late_ms + i % 5 for i in range(per_channel)],
        email_ms=[20.0 + late_ms + i % 7 for i in range(per_channel)],
        delivered_in_window=per_channel * 2,
        backlog=[(t / 2, 3.0) for t in range(5)],
        queues={"deliveries.email": [(0.0, 0.0), (1.0, 2.0)]},
        cpu_ms={"comments": rate * 2 * 1.5, "dispatcher": rate * 2 * 2.0},
        purpose=purpose,
    )


def test_percentiles_use_the_nearest_rank() -> None:
    stats = report.percentiles([float(v) for v in range(1, 101)])

    assert stats == {"count": 100, "p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
    assert report.percentiles([])["p99"] is None


def test_a_steadily_growing_backlog_makes_a_step_unstable() -> None:
    step = _step(50)
    step.backlog = [(t / 2, 400.0 * t) for t in range(5)]

    summary = report.summarise(step, max_p99_ms=1000)

    assert not summary["stable"]
    assert "backlog grew" in summary["unstable_because"][0]


def test_missing_deliveries_and_a_slow_p99_are_named() -> None:
    step = _step(10, late_ms=5000)
    step.email_ms = step.email_ms[:5]

    reasons = report.summarise(step, max_p99_ms=1000)["unstable_because"]

    assert any(r.startswith("email: 5 of 60") for r in reasons)
    assert any(r.startswith("sse p99") for r in reasons)


def test_the_report_has_every_key_and_renders(tmp_path: Path) -> None:
    steps = [
        report.summarise(_step(20), 1000),
        report.summarise(_step(40), 1000),
        report.summarise(_step(80, late_ms=5000), 1000),
        report.summarise(_step(20, purpose="half"), 1000),
    ]
    stored = {"comment_id": 1, "stored_at": 0.004, "notification_id": 2}
    steps[3]["stages_ms"] = stages.breakdown(
        {1: 0.0},
        [{**stored, "type": "sse", "dispatched_at": 0.010, "sent_at": 0.015}],
        {2: 0.018},
        offset=0.0,
    )
    steps[3]["clock_drift_ms"] = 0.01
    baselines = {
        "broker_msgs_per_s": 4000.0,
        "pg_commits_per_s": 9000.0,
        "notify_rtt_us": 100.0,
        "asgi_requests_per_s": 20000.0,
    }
    machine = {"cores": 2, "memory_gib": 4.0, "postgresql": "15", "rabbitmq": "3.10"}

    built = report.build(steps, baselines, machine, {"duration_s": 2})

    assert built["sustained_comments_per_s"] == 40.0
    assert report.half_rate(steps, [20, 40, 80]) == 20.0
    assert built["sse_latency_ms"]["p50"] == 10.0
    assert built["cpu_ms_per_comment"] == {"comments": 1.5, "dispatcher": 2.0}
    assert built["ratios"]["deliveries_vs_broker_msgs"] == 0.06
    for key in ("p50", "p95", "p99", "max"):
        assert key in built["email_latency_ms"]
    assert set(built["baselines"]) == set(baselines)
    json.dumps(built)
    text = report.format_text(built)
    assert "sustained: 40.0 comments/s" in text
    assert built["stages_ms"]["inbox_to_stream"]["p50"] == 3.0
    assert "where POST → SSE time goes at 20 comments/s" in text
    assert "→ event read from the stream" in text
    png = chart.draw(built, tmp_path / "chart.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_a_report_without_a_stage_breakdown_still_renders() -> None:
    steps = [report.summarise(_step(20), 1000)]

    built = report.build(steps, {}, {"cores": 2}, {})

    assert built["stages_ms"] == {}
    assert "where POST → SSE time goes" not in report.format_text(built)


def test_py_spy_stacks_are_summarised_by_function_and_library() -> None:
    api = "/w/services/comments/comments/api.py"
    raw = (
        f"main (/w/bin/x:1);create ({api}:9);run (/v/site-packages/asyncpg/x.py:3) 3\n"
        f"main (/w/bin/x:1);create ({api}:9);dumps (/py/python3.11/json/enc.py:9) 1\n"
    )

    found = pyspy.summarise(raw)

    assert found["samples"] == 4
    assert found["self_pct"][0] == ("run (asyncpg/x.py)", 75.0)
    assert ("asyncpg", 75.0) in found["library_pct"]
    assert ("stdlib:json", 25.0) in found["library_pct"]
    assert found["total_pct"] == [("create (comments/comments/api.py)", 100.0)]
