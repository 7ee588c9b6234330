"""Keys a JSON document gives more than once in one object.

``json.loads`` keeps the last of them without a word, so a document that says two
things is read as saying one. Request bodies and the channel file are both refused
when they repeat a key, naming where.
"""

from __future__ import annotations

import json
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
