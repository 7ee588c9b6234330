"""What ``json.loads`` takes without a word, or refuses in Python's own terms.

Keys a JSON document gives more than once in one object: ``json.loads`` keeps the
last of them, so a document that says two things is read as saying one. Request
bodies and the channel file are both refused when they repeat a key, naming where.

And the limits of Python's reader that no grammar names (:func:`beyond_limits`):
request bodies and messages say them in the same words.
"""

from __future__ import annotations

import json
import sys
from typing import Any

Path = tuple[str, ...]


class _Repeating(dict[str, Any]):
    """A JSON object in which ``repeated`` keys were given more than once."""

    repeated: list[str]


def repeated_keys(text: str | bytes) -> list[tuple[Path, str]]:
    """Each key given twice in one object, with the path to that object (list
    items by their index), in document order; empty when no key is repeated, or
    when the text is not JSON, which the reader's own parsing reports."""
    found = False

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        found = True
        marked = _Repeating(obj)
        seen: set[str] = set()
        marked.repeated = []
        for key, _ in pairs:
            if key in seen and key not in marked.repeated:
                marked.repeated.append(key)
            seen.add(key)
        return marked

    try:
        document = json.loads(text, object_pairs_hook=unique)
    except (ValueError, RecursionError):
        return []
    if not found:
        return []
    repeated: list[tuple[Path, str]] = []
    # Objects nest inside lists, so walk both; iteratively, since a document may
    # nest as deep as the parser allows.
    stack: list[tuple[Path, Any]] = [((), document)]
    while stack:
        at, value = stack.pop()
        if isinstance(value, _Repeating):
            repeated.extend((at, key) for key in value.repeated)
        if isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, list):
            items = [(str(index), item) for index, item in enumerate(value)]
        else:
            continue
        stack.extend(((*at, key), item) for key, item in reversed(items))
    return repeated


def beyond_limits(exc: BaseException) -> str | None:
    """What a document is, when ``json.loads`` raised ``exc`` for one of Python's
    limits rather than for its grammar; None for any other error."""
    if isinstance(exc, RecursionError):
        return "nests arrays or objects too deeply"
    if type(exc) is ValueError and "integer string conversion" in str(exc):
        # A plain ValueError, not a JSON error, past 4300 digits by default.
        return (
            f"has a number of more than {sys.get_int_max_str_digits()} digits, "
            "more than any field takes"
        )
    return None
