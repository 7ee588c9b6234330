"""The push sender's own settings: the VAPID contact and the allow-list of push
services, refused at start when no push service could accept them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from contracts.settings import describe
from push_sender.settings import PushSettings


def complaint(**setting: str) -> str:
    with pytest.raises(ValidationError) as refused:
        PushSettings(**setting)
    return describe(refused.value)


@pytest.mark.parametrize(
    "subject",
    [
        "mailto:ops@example.com",
        "mailto:ops+push@mail.example.com?subject=push",
        "https://example.com",
        "https://example.com:8443/contact",
    ],
)
def test_a_mailto_or_https_subject_is_taken(subject: str) -> None:
    assert PushSettings(vapid_subject=subject).vapid_subject == subject


@pytest.mark.parametrize(
    "subject",
    [
        "notmailto",
        "ops@example.com",
        "mailto:",
        "mailto:ops",
        "mailto:ops @example.com",
        "http://example.com",
        "https://",
        "https://ops:secret@example.com",
        "https://example.com:0/",
        "",
    ],
)
def test_a_subject_that_is_no_mailto_or_https_url_is_refused_naming_it(
    subject: str,
) -> None:
    assert complaint(vapid_subject=subject).startswith(
        "NOTIFLOW_VAPID_SUBJECT: must be a mailto: or https: URL (RFC 8292)"
    )


@pytest.mark.parametrize(
    ("hosts", "taken"),
    [
        ("", frozenset()),
        ("127.0.0.1", {"127.0.0.1"}),
        (
            "fcm.googleapis.com, Updates.Push.Services.Mozilla.com,",
            {"fcm.googleapis.com", "updates.push.services.mozilla.com"},
        ),
        ("::1,push-1.internal", {"::1", "push-1.internal"}),
    ],
)
def test_allowed_push_hosts_are_host_names_or_addresses(
    hosts: str, taken: set[str]
) -> None:
    assert PushSettings(push_allowed_hosts=hosts).allowed_hosts == taken


@pytest.mark.parametrize(
    ("hosts", "named"),
    [
        ("*", "'*' is not taken: no wildcards"),
        ("fcm.googleapis.com,*.push.apple.com", "'*.push.apple.com' is not taken"),
        ("https://fcm.googleapis.com", "'https://fcm.googleapis.com' is not a host"),
        ("push.example:443", "'push.example:443' is not a host name"),
        ("[::1]", "'[::1]': write an IPv6 address without [ ]"),
        ("bücher.example", "'bücher.example' is not ASCII"),
    ],
)
def test_an_allowed_push_host_that_is_no_host_name_is_refused_naming_it(
    hosts: str, named: str
) -> None:
    assert complaint(push_allowed_hosts=hosts).startswith(
        f"NOTIFLOW_PUSH_ALLOWED_HOSTS: {named}"
    )


@pytest.mark.parametrize(
    ("name", "value", "line"),
    [
        (
            "NOTIFLOW_PUSH_ALLOWED_HOSTS",
            "*",
            "notiflow: invalid setting NOTIFLOW_PUSH_ALLOWED_HOSTS: '*' is not "
            "taken: no wildcards; list push services by host name or IP address "
            "alone, as in fcm.googleapis.com,updates.push.services.mozilla.com",
        ),
        (
            "NOTIFLOW_VAPID_SUBJECT",
            "notmailto",
            "notiflow: invalid setting NOTIFLOW_VAPID_SUBJECT: must be a mailto: or "
            "https: URL (RFC 8292), as in mailto:ops@example.com",
        ),
        (
            "NOTIFLOW_PUSH_MAX_SUBSCRIPTIONS_PER_USER",
            "0",
            "notiflow: invalid setting NOTIFLOW_PUSH_MAX_SUBSCRIPTIONS_PER_USER: "
            "Input should be greater than or equal to 1",
        ),
    ],
)
def test_a_push_setting_no_push_service_could_use_stops_the_service(
    name: str, value: str, line: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "push_sender"],
        env={"PATH": "/usr/bin:/bin", "NOTIFLOW_ENV": "test", name: value},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [line]


def test_a_user_may_have_ten_push_subscriptions_unless_configured() -> None:
    assert PushSettings().push_max_subscriptions_per_user == 10
    three = PushSettings(push_max_subscriptions_per_user="3")
    assert three.push_max_subscriptions_per_user == 3


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("0", "greater than or equal to 1"),
        ("-1", "greater than or equal to 1"),
        ("ten", "a whole number, written in digits"),
        ("2.0", "a whole number, written in digits"),
    ],
)
def test_a_subscription_limit_that_is_no_positive_number_is_refused_naming_it(
    value: str, says: str
) -> None:
    said = complaint(push_max_subscriptions_per_user=value)

    assert said.startswith("NOTIFLOW_PUSH_MAX_SUBSCRIPTIONS_PER_USER: ")
    assert says in said
