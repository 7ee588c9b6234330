"""Ways to write a row's id that a lenient integer parser would take for the id."""

from __future__ import annotations

from urllib.parse import quote


def other_spellings(row_id: int) -> list[str]:
    """Path segments, percent-encoded as sent, each naming ``row_id`` only loosely:
    a sign, leading zeros, spaces, a decimal point, digit separators, digits from
    another script. Python's ``int`` or pydantic's lax mode reads most of them as
    the id itself."""
    digits = str(row_id)
    return [
        f"+{digits}",
        f"0{digits}",
        f"00{digits}",
        f"%20{digits}",
        f"{digits}%20",
        f"%09{digits}",
        f"{digits}%0A",
        f"{digits}.0",
        f"0_{digits}",
        f"+0_{digits}",
        quote("".join(chr(0xFF10 + int(d)) for d in digits)),
    ]
