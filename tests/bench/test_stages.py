"""The stage breakdown of POST → SSE latency, on made-up rows.

Times in the rows are wall-clock seconds, as PostgreSQL gives them; the bench's are
perf_counter seconds, 1,000 s behind in these tests.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from bench import report, stages

OFFSET = 1000.0  # wall clock minus perf_counter


def row(
    comment: int,
    notification: int,
    kind: str,
    stored: float,
    dispatched: float,
    sent: float | None,
) -> dict[str, Any]:
    return {
        "comment_id": comment,
        "stored_at": stored + OFFSET,
        "notification_id": notification,
        "type": kind,
        "dispatched_at": dispatched + OFFSET,
        "sent_at": None if sent is None else sent + OFFSET,
    }


def test_each_stage_runs_from_one_timestamp_to_the_next() -> None:
    due = {1: 10.000}
    rows = [
        row(1, 11, "sse", stored=10.004, dispatched=10.014, sent=10.020),
        row(1, 12, "email", stored=10.004, dispatched=10.014, sent=10.054),
    ]
    streamed = {11: 10.023}

    found = stages.breakdown(due, rows, streamed, OFFSET)

    assert found["due_to_stored"]["p50"] == pytest.approx(4.0)
    assert found["stored_to_dispatched"]["p50"] == pytest.approx(10.0)
    assert found["dispatched_to_inbox"]["p50"] == pytest.approx(6.0)
    assert found["inbox_to_stream"]["p50"] == pytest.approx(3.0)
    assert found["due_to_stream"]["p50"] == pytest.approx(23.0)
    assert found["dispatched_to_email_sent"]["p50"] == pytest.approx(40.0)


def test_a_comment_counts_once_and_a_row_once_per_stage() -> None:
    due = {1: 10.0, 2: 20.0}
    rows = [
        row(
            c,
            c * 10 + k,
            kind,
            stored=due[c] + 0.005,
            dispatched=due[c] + 0.015,
            sent=due[c] + 0.020,
        )
        for c in (1, 2)
        for k, kind in enumerate(("sse", "sse", "sse", "email", "email", "email"))
    ]
    streamed = {n["notification_id"]: n["sent_at"] - OFFSET + 0.002 for n in rows}

    found = stages.breakdown(due, rows, streamed, OFFSET)

    assert found["due_to_stored"]["count"] == 2
    assert found["stored_to_dispatched"]["count"] == 2
    assert found["dispatched_to_inbox"]["count"] == 6
    assert found["inbox_to_stream"]["count"] == 6
    assert found["dispatched_to_email_sent"]["count"] == 6


def test_rows_not_sent_or_not_streamed_leave_only_the_stages_they_lack() -> None:
    due = {1: 10.0}
    rows = [
        row(1, 11, "sse", stored=10.004, dispatched=10.014, sent=None),
        row(1, 12, "sse", stored=10.004, dispatched=10.014, sent=10.020),
        row(1, 13, "email", stored=10.004, dispatched=10.014, sent=None),
        row(2, 21, "sse", stored=20.0, dispatched=20.0, sent=20.0),  # not ours
    ]

    found = stages.breakdown(due, rows, {}, OFFSET)

    assert found["due_to_stored"]["count"] == 1
    assert found["dispatched_to_inbox"]["count"] == 1
    assert found["inbox_to_stream"]["count"] == 0
    assert found["inbox_to_stream"]["p50"] is None
    assert found["dispatched_to_email_sent"]["count"] == 0


def test_a_batched_dispatch_dates_the_comment_by_its_earliest_row() -> None:
    due = {1: 10.0}
    rows = [
        row(1, 11, "sse", stored=10.004, dispatched=10.030, sent=10.040),
        row(1, 12, "sse", stored=10.004, dispatched=10.014, sent=10.040),
    ]

    found = stages.breakdown(due, rows, {}, OFFSET)

    assert found["stored_to_dispatched"]["p50"] == pytest.approx(10.0)


def test_a_wrong_offset_moves_time_between_the_first_and_last_stage_only() -> None:
    due = {1: 10.0}
    rows = [row(1, 11, "sse", stored=10.004, dispatched=10.014, sent=10.020)]
    streamed = {11: 10.023}

    found = stages.breakdown(due, rows, streamed, OFFSET + 0.002)

    assert found["due_to_stored"]["p50"] == pytest.approx(2.0)
    assert found["stored_to_dispatched"]["p50"] == pytest.approx(10.0)
    assert found["dispatched_to_inbox"]["p50"] == pytest.approx(6.0)
    assert found["inbox_to_stream"]["p50"] == pytest.approx(5.0)
    assert found["due_to_stream"]["p50"] == pytest.approx(23.0)


def test_every_stage_the_report_names_is_computed() -> None:
    found = stages.breakdown({}, [], {}, OFFSET)

    assert list(found) == list(report.STAGE_LABELS)
    assert all(stats["count"] == 0 for stats in found.values())


def test_the_clock_offset_turns_perf_counter_into_wall_clock() -> None:
    offset = stages.clock_offset()

    assert abs(time.perf_counter() + offset - time.time()) < 0.5
