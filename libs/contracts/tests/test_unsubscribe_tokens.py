"""The tokens of unsubscribe links: genuine ones pass, nothing else does."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from contracts.auth import (
    MAX_ID,
    InvalidLinkToken,
    InvalidToken,
    Unsubscribe,
    issue_token,
    unsubscribe_token,
    unsubscribe_url,
    verify_token,
    verify_unsubscribe_token,
)
from contracts.settings import Settings

SECRET = "unsubscribe-tests-" + "k" * 32
OTHER_SECRET = "another-secret-" + "x" * 32


def test_a_token_names_its_user_and_the_email_channel() -> None:
    token = unsubscribe_token(7, SECRET)

    assert verify_unsubscribe_token(token, SECRET) == Unsubscribe(7, "email")


def test_the_same_user_always_gets_the_same_url_safe_token() -> None:
    first = unsubscribe_url("https://notify.example.com/", 7, SECRET)
    again = unsubscribe_url("https://notify.example.com", 7, SECRET)

    assert first == again
    assert first.startswith("https://notify.example.com/unsubscribe?token=7.email.")
    token = first.partition("?token=")[2]
    allowed = set("0123456789.-_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert set(token) <= allowed


def _flip(char: str) -> str:
    return "A" if char != "A" else "B"


def _tampered_signature(token: str) -> str:
    return token[:-5] + _flip(token[-5]) + token[-4:]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: None, "missing"),
        (lambda: "", "missing"),
        (lambda: "garbage", "not an unsubscribe link's token"),
        (lambda: _tampered_signature(unsubscribe_token(7, SECRET)), "signature"),
        # Another user's id with this user's signature.
        (lambda: "8" + unsubscribe_token(7, SECRET)[1:], "signature"),
        (lambda: unsubscribe_token(7, SECRET)[:-1], "not an unsubscribe"),
        (lambda: unsubscribe_token(7, SECRET)[:10], "not an unsubscribe"),
        (lambda: unsubscribe_token(7, SECRET) + "A", "not an unsubscribe"),
        (lambda: unsubscribe_token(7, OTHER_SECRET), "signature"),
        (lambda: unsubscribe_token(7, SECRET).replace(".email.", ".sse."), "not an"),
        (lambda: "07" + unsubscribe_token(7, SECRET)[1:], "not an unsubscribe"),
        (lambda: unsubscribe_token(7, SECRET).replace("7", "٧", 1), "not an"),
        (lambda: f"{MAX_ID + 1}" + unsubscribe_token(7, SECRET)[1:], "not an"),
    ],
    ids=[
        "none",
        "empty",
        "garbage",
        "tampered",
        "other user",
        "truncated by one",
        "truncated",
        "extended",
        "other secret",
        "other channel",
        "leading zero",
        "non-ascii digit",
        "id beyond bigint",
    ],
)
def test_a_token_that_is_not_genuine_is_refused_saying_why(
    make: Callable[[], str | None], message: str
) -> None:
    token = make()

    with pytest.raises(InvalidLinkToken, match=message):
        verify_unsubscribe_token(token, SECRET)


def test_a_bearer_token_is_no_unsubscribe_token() -> None:
    settings = Settings(secret_key=SECRET)
    bearer = issue_token(7, "bob", settings)

    with pytest.raises(InvalidLinkToken, match="not an unsubscribe link's token"):
        verify_unsubscribe_token(bearer, SECRET)


def test_an_unsubscribe_token_is_no_bearer_token() -> None:
    settings = Settings(secret_key=SECRET)

    with pytest.raises(InvalidToken, match="invalid"):
        verify_token(unsubscribe_token(7, SECRET), settings)


@pytest.mark.parametrize("user_id", [0, -1, MAX_ID + 1])
def test_no_token_is_made_for_an_id_that_can_name_no_user(user_id: int) -> None:
    with pytest.raises(ValueError, match="user id must be"):
        unsubscribe_token(user_id, SECRET)


def test_no_token_is_made_for_a_channel_no_link_turns_off() -> None:
    with pytest.raises(ValueError, match="channel type must be one of email"):
        unsubscribe_token(7, SECRET, "sse")
