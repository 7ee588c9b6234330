"""The SMTP waits the email sender takes, the lease they must fit in, and the
warning it gives at start when a stop's drain may cut an email short."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from contracts.settings import describe
from email_sender.app import EmailSettings, create_app


def test_the_default_lease_outlives_a_conversation_with_a_slow_content_reply() -> None:
    settings = EmailSettings()

    assert settings.smtp_data_timeout > settings.smtp_timeout
    assert settings.email_lease_seconds > settings.smtp_conversation_seconds


def test_the_wait_for_the_reply_to_the_content_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFLOW_SMTP_DATA_TIMEOUT", "90")
    monkeypatch.setenv("NOTIFLOW_EMAIL_LEASE_SECONDS", "300")

    assert EmailSettings().smtp_data_timeout == 90


@pytest.mark.parametrize("value", [0, -1])
def test_a_wait_for_the_reply_to_the_content_that_is_not_positive_is_refused(
    value: float,
) -> None:
    with pytest.raises(ValidationError) as refused:
        EmailSettings(smtp_data_timeout=value)

    [line] = describe(refused.value).splitlines()
    assert line.startswith("NOTIFLOW_SMTP_DATA_TIMEOUT: "), line


def test_a_lease_that_a_slow_reply_to_the_content_could_outlast_is_refused() -> None:
    # 4 x 10 s for the other replies, 90 s for the content's: 130 s.
    with pytest.raises(ValidationError) as refused:
        EmailSettings(smtp_timeout=10, smtp_data_timeout=90, email_lease_seconds=120)

    [line] = describe(refused.value).splitlines()
    assert line.startswith("NOTIFLOW_EMAIL_LEASE_SECONDS"), line
    assert "(130s" in line
    assert "NOTIFLOW_SMTP_DATA_TIMEOUT" in line


def test_a_lease_longer_than_a_conversation_with_a_long_wait_is_taken() -> None:
    settings = EmailSettings(
        smtp_timeout=10, smtp_data_timeout=600, email_lease_seconds=700
    )

    assert settings.smtp_conversation_seconds == 640


def _short_drain_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if getattr(r, "action", "") == "email.short_drain"
    ]


def test_a_drain_shorter_than_a_conversation_is_warned_of_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = EmailSettings(drain_seconds=10)

    with caplog.at_level(logging.WARNING, logger="email_sender"):
        create_app(settings)

    [warning] = _short_drain_warnings(caplog)
    assert warning.levelno == logging.WARNING
    assert warning.args == (10, settings.smtp_conversation_seconds)
    assert "NOTIFLOW_DRAIN_SECONDS" in warning.getMessage()


def test_a_drain_that_covers_a_conversation_starts_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = EmailSettings(drain_seconds=105)

    with caplog.at_level(logging.WARNING, logger="email_sender"):
        create_app(settings)

    assert _short_drain_warnings(caplog) == []
