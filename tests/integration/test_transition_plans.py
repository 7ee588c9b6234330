"""The statements that move a notification from status to status find their rows
through the primary key, whatever PostgreSQL's statistics say.

The partial indexes on ``status`` keep an entry for every version a row had in that
status until a vacuum. When the statistics say few rows wait (the usual case), a
plan that combined those indexes with the ids looks cheap, and reads every row sent
since the last vacuum on each call instead.
"""

from __future__ import annotations

import json

import asyncpg
import pytest

from contracts import transitions
from email_sender.worker import CLAIM as EMAIL_BATCH_CLAIM
from tests.integration import helpers
from tests.integration.conftest import EmailSenderFactory
from tests.support.data import Demo

pytestmark = pytest.mark.integration

STATUS_INDEXES = ("notifications_pending_idx", "notifications_status_idx")

# (name, statement, sample arguments once ids are known)
STATEMENTS = {
    "email batch claim": (EMAIL_BATCH_CLAIM, lambda ids: (ids, 60.0)),
    "push claim": (transitions.claim_sql("push", "id"), lambda ids: (ids[0], 60.0)),
    "claim of many": (
        transitions.claim_many_sql("email", "id"),
        lambda ids: (ids, 60.0),
    ),
    "sent": (transitions.SENT, lambda ids: (ids[0], "{}")),
    "sent, many": (transitions.SENT_MANY, lambda ids: (ids,)),
    "retrying": (transitions.RETRYING, lambda ids: (ids[0], "{}", "busy", 5.0)),
    "failed": (transitions.FAILED, lambda ids: (ids[0], "{}", "refused")),
    "skipped": (transitions.SKIPPED, lambda ids: (ids[0], "{}", "no address")),
}


async def _sent_rows(db: asyncpg.Connection, demo: Demo, count: int) -> None:
    ids = [
        await helpers.email_row(db, demo.bob, "bob@example.com") for _ in range(count)
    ]
    for status in ("sending", "sent"):
        await db.execute(
            "UPDATE notifications SET status = $2 WHERE id = ANY($1)", ids, status
        )


async def _churned(db: asyncpg.Connection, demo: Demo) -> list[int]:
    """Rows sent and analysed, then as many again sent since, as between two
    vacuums; returns a few rows still pending."""
    await _sent_rows(db, demo, 1000)
    await db.execute("VACUUM ANALYZE notifications")
    await _sent_rows(db, demo, 1000)
    return [await helpers.email_row(db, demo.bob, "bob@example.com") for _ in range(3)]


async def _indexes_used(
    db: asyncpg.Connection, statement: str, args: tuple[object, ...], mode: str
) -> set[str]:
    await db.execute(f"SET plan_cache_mode = {mode}")
    await db.execute(f"PREPARE transition AS {statement}")
    try:
        literals = ", ".join(_literal(arg) for arg in args)
        plan = await db.fetchval(
            f"EXPLAIN (FORMAT JSON) EXECUTE transition({literals})"
        )
        return set(_index_names(json.loads(plan)))
    finally:
        await db.execute("DEALLOCATE transition")


def _literal(arg: object) -> str:
    if isinstance(arg, list):
        return "ARRAY[" + ",".join(str(int(n)) for n in arg) + "]::bigint[]"
    if isinstance(arg, str):
        return "'" + arg.replace("'", "''") + "'"
    return repr(arg)


def _index_names(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["Index Name"]] if "Index Name" in node else []
        return found + [name for value in node.values() for name in _index_names(value)]
    if isinstance(node, list):
        return [name for item in node for name in _index_names(item)]
    return []


@pytest.mark.parametrize("mode", ["force_generic_plan", "force_custom_plan"])
async def test_a_transition_finds_its_rows_by_id_not_through_the_status_indexes(
    db: asyncpg.Connection, demo: Demo, mode: str
) -> None:
    ids = await _churned(db, demo)

    used = {
        name: await _indexes_used(db, statement, sample(ids), mode)
        for name, (statement, sample) in STATEMENTS.items()
    }

    assert {name: indexes & set(STATUS_INDEXES) for name, indexes in used.items()} == {
        name: set() for name in STATEMENTS
    }
    assert all("notifications_pkey" in indexes for indexes in used.values()), used


async def test_the_email_sender_plans_its_statements_once_per_connection(
    email_sender: EmailSenderFactory,
) -> None:
    async with email_sender() as app:
        async with app.state.runtime.db.acquire() as conn:
            mode = await conn.fetchval("SHOW plan_cache_mode")

    assert mode == "force_generic_plan"
