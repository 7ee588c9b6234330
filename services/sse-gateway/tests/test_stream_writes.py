"""What one write to a stream holds."""

from __future__ import annotations

from sse_gateway.stream import WRITE_BYTES, _writes


def test_events_are_written_in_order_a_bounded_write_at_a_time() -> None:
    bodies = [b"a" * 40_000, b"b" * 30_000, b"c" * 10, b"d" * 100_000, b"e"]

    writes = list(_writes(bodies))

    assert b"".join(writes) == b"".join(bodies)
    assert [len(w) for w in writes] == [40_000, 30_010, 100_000, 1]
    assert all(len(w) <= WRITE_BYTES for w in writes if len(set(w)) > 1)
    assert list(_writes([])) == []
