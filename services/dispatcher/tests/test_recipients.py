from __future__ import annotations

import pytest

from contracts.mentions import mentioned_usernames
from dispatcher.recipients import AUTHOR, MENTIONED, PARTICIPANT, resolve


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("hi @bob", ["bob"]),
        ("@bob, @carol! and @dave.", ["bob", "carol", "dave"]),
        ("(@bob) @carol? @dave:", ["bob", "carol", "dave"]),
        ("write to carol@example.com", []),
        ("@Bob and @bob again", ["bob"]),
        ("@@bob is not a mention", []),
        ("@" + "x" * 33 + " is too long for a username", []),
        ("no mentions at all", []),
        ("line one\n@carol on line two", ["carol"]),
        ("@bob's turn, then é@carol", ["bob"]),
        ("ask @bob@example.social or @carol", ["carol"]),
        ("@bob@example.com is his address", []),
        ("@bob@bob", []),
        ("see https://example.social/@bob/123 and @dave", ["dave"]),
        ("@bob/@carol", ["bob", "carol"]),
        ("<https://example.social/@bob>, @carol", ["carol"]),
        ("mailto://x/@bob then @dave", ["dave"]),
        ("see youtube.com/@bob for the video, @carol", ["carol"]),
        ("www.example.com:8080/u/@bob and @dave", ["dave"]),
        ("o'@bob.example and x=@carol.example", []),
        ("**@bob** and `@carol`", ["bob", "carol"]),
        ("@bob/@carol/@dave", ["bob", "carol", "dave"]),
    ],
)
def test_mentions_are_words_starting_with_at(body: str, expected: list[str]) -> None:
    assert mentioned_usernames(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("hi @bób", id="a letter of another script inside the name"),
        pytest.param("hi @bobé", id="a letter of another script after the name"),
        pytest.param("hi @bob\u0663", id="a digit of another script"),
        pytest.param("hi @joe\u0301", id="a combining mark: a decomposed joé"),
        pytest.param("joe\u0301@bob", id="a combining mark before the @"),
    ],
)
def test_a_mention_ends_only_where_the_word_ends_in_any_script(body: str) -> None:
    assert mentioned_usernames(body) == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param("ask @bob\u200b@example.social", [], id="zero-width space"),
        pytest.param("ask @bob\u2060@example.social", [], id="word joiner"),
        pytest.param("ask @bob\u00ad@example.social", [], id="soft hyphen"),
        pytest.param("carol\u200d@bob.example", [], id="zero-width joiner before"),
        pytest.param(
            "hi @bo\u200bb and @\u200ecarol", ["bob", "carol"], id="inside the name"
        ),
        pytest.param("hi \u200f@bob\u200e!", ["bob"], id="direction marks around"),
    ],
)
def test_invisible_characters_do_not_change_what_a_mention_is(
    body: str, expected: list[str]
) -> None:
    assert mentioned_usernames(body) == expected


def test_author_participants_and_mentions_are_each_notified_once() -> None:
    found = resolve(
        commenter_id=3,
        post_author_id=1,
        participant_ids=[2, 1, 2],
        mentioned_ids=[2, 4],
    )

    assert [(r.user_id, r.reasons) for r in found] == [
        (1, [AUTHOR, PARTICIPANT]),
        (2, [PARTICIPANT, MENTIONED]),
        (4, [MENTIONED]),
    ]


def test_commenter_is_never_notified_even_mentioning_themselves_on_own_post() -> None:
    found = resolve(
        commenter_id=1, post_author_id=1, participant_ids=[1], mentioned_ids=[1]
    )

    assert found == []


def test_unknown_usernames_resolve_to_nobody() -> None:
    # Mentions are resolved to ids by the database; unknown names simply
    # produce no id, and only the post's author is left.
    found = resolve(
        commenter_id=2, post_author_id=1, participant_ids=[], mentioned_ids=[]
    )

    assert [(r.user_id, r.reasons) for r in found] == [(1, [AUTHOR])]
