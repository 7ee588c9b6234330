"""Which channel types a user wants, in ``notification_preferences``.

A type is wanted unless the user turned it off: a user with no row for a type gets
it. The dispatcher reads the rows that say ``enabled = false`` and records that
user's notifications of the type as ``skipped``, sending nothing; a change applies
to the events it dispatches after the change commits.

Turning a type off also stops what of it is already on its way to the user, in the
same transaction as the change: their rows of the type still ``pending`` or
``retrying`` become ``skipped``, and a sender that later receives such a row's
message, or its retry, finds it so and sends nothing. A row of an event the
dispatcher was storing while the change committed (it read the preference just
before) is skipped by its sender instead, which looks at the preference when it
takes a row (``contracts.transitions``). Only a row already ``sending`` still goes
out: a worker holds it, and may be talking to the mail server already. Turning the
type back on revives none of the skipped rows.

A change is announced to the user's open streams as a ``preferences`` event (its
data ``{}``: a page reads ``GET /preferences`` again), sent by the transaction that
made it; a request that sets every type it names to what it is already, alone or at
the same moment as an identical one, announces nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import asyncpg
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from contracts.auth import UnknownUser
from contracts.topology import CHANNEL_TYPES
from sse_gateway import inbox

READ = "SELECT type, enabled FROM notification_preferences WHERE user_id = $1"

# One statement, so the change commits on its own and all at once. A type is
# written only when its value differs from the row as it is at that moment: the
# conflict's update waits for any other change of the row to commit and compares
# with the result, so of two identical changes at once only the first changes
# anything. RETURNING holds the rows written, ``inserted`` telling a new row (a
# change only when it turns the type off: no row means wanted) from one updated.
# The types not given come from the table.
CHANGE = """
WITH changed AS (
    INSERT INTO notification_preferences AS p (user_id, type, enabled)
    SELECT $1, given.type, given.enabled
    FROM unnest($2::text[], $3::boolean[]) AS given(type, enabled)
    ON CONFLICT (user_id, type) DO UPDATE SET enabled = EXCLUDED.enabled
    WHERE p.enabled IS DISTINCT FROM EXCLUDED.enabled
    RETURNING type, enabled, xmax = 0 AS inserted
)
SELECT type, enabled, NOT (inserted AND enabled) AS differs FROM changed
UNION ALL
SELECT type, enabled, false FROM notification_preferences
WHERE user_id = $1 AND type <> ALL($2::text[])
"""

# The rows of the types turned off ($2) still waiting to go out to the user.
# Each branch of the OR is one partial index (notifications_pending_idx by type,
# notifications_status_idx by status), so the statement reads the rows of those
# types waiting for anyone, never the user's history: about 30 ms with 85,000
# emails waiting. The conditions are checked again on each row once it is locked,
# so a row a sender claims meanwhile is left to the sender.
SKIP_WAITING = """
WITH skipped AS (
    UPDATE notifications
    SET status = 'skipped', last_error = type || ' disabled by preference',
        next_attempt_at = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE user_id = $1
      AND ((status = 'pending' AND type = ANY($2::text[]))
           OR (status = 'retrying' AND type = ANY($2::text[])))
    RETURNING 1
)
SELECT count(*) FROM skipped
"""

_SHOWN_CHARS = 40


class Changed(NamedTuple):
    """What a change left: every type and whether it is wanted, how many of the
    user's notifications waiting to be sent it stopped, and the types it set to
    another value than they had."""

    wanted: dict[str, bool]
    skipped: int
    differs: dict[str, bool]

    def log(self, logger: logging.Logger, user_id: int, via: str | None = None) -> None:
        """Tell operators what changed, on ``logger``; nothing if nothing did."""
        if not self.differs and not self.skipped:
            return
        logger.info(
            "preferences changed: %s%s; %d waiting notifications skipped",
            described(self.differs),
            f", by the {via.replace('_', ' ')}" if via else "",
            self.skipped,
            extra={
                "action": "preferences.changed",
                "user_id": user_id,
                "skipped": self.skipped,
                **({"via": via} if via else {}),
            },
        )


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


def described(types: Mapping[str, bool]) -> str:
    """``types`` for a log line: ``email off, sse on``, or ``none`` if empty."""
    return (
        ", ".join(f"{name} {'on' if on else 'off'}" for name, on in types.items())
        or "none"
    )


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
) -> Changed:
    """Store ``given`` and skip what waits of the types it turns off."""
    off = [name for name, on in given.items() if not on]
    try:
        async with pg.transaction():
            rows = await pg.fetch(CHANGE, user_id, list(given), list(given.values()))
            # Also when a type was off already: a row of an event stored while
            # it was being turned off may still wait.
            skipped = await pg.fetchval(SKIP_WAITING, user_id, off) if off else 0
            written = {row["type"]: row["enabled"] for row in rows if row["differs"]}
            differs = {t: written[t] for t in CHANNEL_TYPES if t in written}
            if differs:
                # Delivered at commit to every replica, which tells the user's
                # pages to read their preferences again.
                await inbox.announce(pg, {"kind": "preferences", "u": user_id})
    except asyncpg.ForeignKeyViolationError:
        # The table's one foreign key is its user's: the user was deleted after
        # the request's token was checked. Nothing was stored.
        raise UnknownUser(user_id) from None
    # A given type no row came back for was set to its value already.
    return Changed({**_as_map(rows), **given}, skipped, differs)
