"""Which channel types a user wants, in ``notification_preferences``.

A type is wanted unless the user turned it off: a user with no row for a type gets
it. The dispatcher reads the rows that say ``enabled = false`` and records that
user's notifications of the type as ``skipped``, sending nothing; a change applies
to the events it dispatches after the change commits.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import asyncpg
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from contracts.auth import UnknownUser
from contracts.topology import CHANNEL_TYPES

READ = "SELECT type, enabled FROM notification_preferences WHERE user_id = $1"

# One statement, so the change commits on its own and all at once. The SELECT
# after the CTE sees the table as it was before the statement, so the rows just
# written come from RETURNING and only the other types from the table.
CHANGE = """
WITH changed AS (
    INSERT INTO notification_preferences (user_id, type, enabled)
    SELECT $1, given.type, given.enabled
    FROM unnest($2::text[], $3::boolean[]) AS given(type, enabled)
    ON CONFLICT (user_id, type) DO UPDATE SET enabled = EXCLUDED.enabled
    RETURNING type, enabled
)
SELECT type, enabled FROM changed
UNION ALL
SELECT type, enabled FROM notification_preferences
WHERE user_id = $1 AND type <> ALL($2::text[])
"""

_SHOWN_CHARS = 40


class PreferenceChange(BaseModel):
    """Some channel types, each set to ``true`` (wanted) or ``false`` (not)."""

    model_config = ConfigDict(extra="forbid")

    # None only stands for "not given": an explicit null is refused below, as is
    # anything but a JSON boolean (pydantic would read 0 or "false" as false).
    email: bool | None = None
    sse: bool | None = None
    push: bool | None = None

    @field_validator(*CHANNEL_TYPES, mode="before")
    @classmethod
    def _boolean(cls, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, not {_shown(value)}")
        return value

    @model_validator(mode="after")
    def _names_something(self) -> PreferenceChange:
        if not self.model_fields_set:
            raise ValueError(f"must name at least one of {', '.join(CHANNEL_TYPES)}")
        return self

    def given(self) -> dict[str, bool]:
        given = self.model_fields_set
        return {name: getattr(self, name) for name in CHANNEL_TYPES if name in given}


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…"


def _as_map(rows: Iterable[asyncpg.Record]) -> dict[str, bool]:
    stored = {row["type"]: row["enabled"] for row in rows}
    return {name: stored.get(name, True) for name in CHANNEL_TYPES}


async def read(pg: asyncpg.Connection, user_id: int) -> dict[str, bool]:
    """Every channel type, and whether the user wants it."""
    return _as_map(await pg.fetch(READ, user_id))


async def change(
    pg: asyncpg.Connection, user_id: int, given: Mapping[str, bool]
) -> dict[str, bool]:
    """Store ``given``; every channel type, and whether the user now wants it."""
    try:
        rows = await pg.fetch(CHANGE, user_id, list(given), list(given.values()))
    except asyncpg.ForeignKeyViolationError:
        # The table's one foreign key is its user's: the user was deleted after
        # the request's token was checked. Nothing was stored.
        raise UnknownUser(user_id) from None
    return _as_map(rows)
