"""Who gets a stream: which Last-Event-IDs count, how many streams, the refusals."""

from __future__ import annotations

import pytest

from sse_gateway.stream import notification_id_of


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("1", 1),
        ("42", 42),
        (str(2**63 - 1), 2**63 - 1),
        (str(2**63), None),
        ("9" * 5000, None),
        ("0", None),
        ("-1", None),
        ("+1", None),
        ("1.0", None),
        ("²", None),  # isdigit() says yes, int() says no
        ("١٢", None),  # Arabic-Indic digits, which int() would read as 12
        ("", None),
        (None, None),
    ],
)
def test_only_a_decimal_bigint_names_a_notification(
    header: str | None, expected: int | None
) -> None:
    assert notification_id_of(header) == expected
