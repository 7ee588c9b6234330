"""Which channel each notification row comes from, per channel type: no database."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from contracts.messages import CommentCreated
from dispatcher import channels, templates
from dispatcher.recipients import AUTHOR, MENTIONED, PARTICIPANT, Recipient
from dispatcher.service import Dispatcher

ALICE, BOB, CAROL, DAVE = 1, 2, 3, 4
REPLY = {"types": ["email", "sse"], "template": "comment_reply", "priority": 2}
MENTION = {
    "types": ["email", "sse", "push"],
    "template": "comment_mention",
    "priority": 8,
}


def person(user_id: int, name: str) -> dict[str, Any]:
    return {
        "id": user_id,
        "username": name,
        "display_name": name.title(),
        "email": f"{name}@example.com",
    }


USERS = {
    ALICE: person(ALICE, "alice"),
    BOB: person(BOB, "bob"),
    CAROL: person(CAROL, "carol"),
    DAVE: person(DAVE, "dave"),
}


def rows_for(
    tmp_path: Path, chosen: dict[str, dict[str, Any]], recipients: list[Recipient]
) -> dict[tuple[int, str], dict[str, Any]]:
    """The rows carol's comment on alice's post makes under the channel file
    ``chosen``, by (user, type)."""
    path = tmp_path / "channels.json"
    path.write_text(json.dumps({"channels": chosen}))
    renderer = templates.Renderer()
    dispatcher = Dispatcher(
        channels.ChannelConfigs(path, renderer.problem),
        renderer,
        "http://127.0.0.1:8081",
        secret_key="rows-tests-" + "s" * 32,
    )
    event = CommentCreated(
        event_id=uuid.uuid4(),
        occurred_at=datetime(2026, 1, 5, 9, 30, tzinfo=UTC),
        comment_id=10,
        post_id=100,
        author_id=CAROL,
        body="@bob @alice hi",
    )
    post = {"id": 100, "title": "Welcome", "author_id": ALICE}

    rows = dispatcher._rows(event, post, USERS[CAROL], recipients, USERS, set())

    fields = ("user_id", "email", "title", "message", "type", "channel")
    fields += ("priority", "metadata", "status", "last_error")
    table = [dict(zip(fields, row, strict=True)) for row in rows]
    keys = [(row["user_id"], row["type"]) for row in table]
    assert len(keys) == len(set(keys)), "one row per (event, user, type)"
    return dict(zip(keys, table, strict=True))


def channels_of(
    table: dict[tuple[int, str], dict[str, Any]],
) -> dict[tuple[int, str], tuple[str, int]]:
    return {key: (row["channel"], row["priority"]) for key, row in table.items()}


AUTHOR_MENTIONED = Recipient(ALICE, [AUTHOR, MENTIONED])
ONLY_MENTIONED = Recipient(BOB, [MENTIONED])
PARTICIPANT_MENTIONED = Recipient(DAVE, [PARTICIPANT, MENTIONED])
BY_REPLY = ("comment.reply", 2)
BY_MENTION = ("comment.mention", 8)


@pytest.mark.parametrize(
    ("mention", "expected"),
    [
        pytest.param(
            {**MENTION, "enabled": False},
            {(ALICE, "email"): BY_REPLY, (ALICE, "sse"): BY_REPLY},
            id="mention disabled",
        ),
        pytest.param(
            None,
            {(ALICE, "email"): BY_REPLY, (ALICE, "sse"): BY_REPLY},
            id="mention left out of the file",
        ),
        pytest.param(
            {**MENTION, "types": ["sse"]},
            {
                (ALICE, "email"): BY_REPLY,
                (ALICE, "sse"): BY_MENTION,
                (BOB, "sse"): BY_MENTION,
            },
            id="mention by sse only",
        ),
        pytest.param(
            {**MENTION, "types": ["push"]},
            {
                (ALICE, "email"): BY_REPLY,
                (ALICE, "sse"): BY_REPLY,
                (ALICE, "push"): BY_MENTION,
                (BOB, "push"): BY_MENTION,
            },
            id="mention by push only",
        ),
    ],
)
def test_a_mentioned_post_author_keeps_the_reply_types_the_mention_channel_lacks(
    tmp_path: Path,
    mention: dict[str, Any] | None,
    expected: dict[tuple[int, str], tuple[str, int]],
) -> None:
    chosen = {"comment.reply": REPLY}
    if mention is not None:
        chosen["comment.mention"] = mention

    table = rows_for(tmp_path, chosen, [AUTHOR_MENTIONED, ONLY_MENTIONED])

    assert channels_of(table) == expected


def test_a_mentioned_participant_gets_each_type_once_from_the_most_specific_channel(
    tmp_path: Path,
) -> None:
    chosen = {
        "comment.reply": {**REPLY, "types": ["email", "sse", "push"]},
        "comment.mention": {**MENTION, "types": ["sse", "push"]},
    }

    table = rows_for(tmp_path, chosen, [PARTICIPANT_MENTIONED])

    assert channels_of(table) == {
        (DAVE, "email"): BY_REPLY,
        (DAVE, "sse"): BY_MENTION,
        (DAVE, "push"): BY_MENTION,
    }


def test_each_row_is_rendered_by_its_own_channel_and_keeps_every_reason(
    tmp_path: Path,
) -> None:
    chosen = {
        "comment.reply": REPLY,
        "comment.mention": {**MENTION, "types": ["sse"]},
    }

    table = rows_for(tmp_path, chosen, [AUTHOR_MENTIONED])

    email, sse = table[(ALICE, "email")], table[(ALICE, "sse")]
    assert email["title"] == "Carol commented on “Welcome”"
    assert sse["title"] == "Carol mentioned you on “Welcome”"
    assert "html" in email["metadata"] and "html" not in sse["metadata"]
    assert (
        email["metadata"]["reasons"]
        == sse["metadata"]["reasons"]
        == [
            AUTHOR,
            MENTIONED,
        ]
    )
    assert email["status"] == sse["status"] == "pending"
