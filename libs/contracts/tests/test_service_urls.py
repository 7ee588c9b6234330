"""The database and broker URLs: which are refused, and how they are shown."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from contracts.settings import Settings, describe, redact_url

UNREADABLE = "(a URL that cannot be read)"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://postgres:hunter22@127.0.0.1:5432/notiflow",
            "postgresql://postgres:***@127.0.0.1:5432/notiflow",
        ),
        ("amqp://guest:hunter22@127.0.0.1/", "amqp://guest:***@127.0.0.1/"),
        ("amqps://me:p%40ss@mq.example:5671/v", "amqps://me:***@mq.example:5671/v"),
        ("amqp://guest:p@ss@127.0.0.1/", "amqp://guest:***@127.0.0.1/"),
        ("amqp://guest:@127.0.0.1/", "amqp://guest:***@127.0.0.1/"),
        ("amqp://u:hunter22@[::1]:5672/v", "amqp://u:***@[::1]:5672/v"),
        ("postgresql://postgres@127.0.0.1/x", "postgresql://postgres@127.0.0.1/x"),
        ("postgresql:///notiflow?host=/run/postgresql", "postgresql:///notiflow"),
        ("amqp://guest:guest@h/v?auth=hunter22#hunter22", "amqp://guest:***@h/v"),
    ],
)
def test_a_url_is_shown_with_its_password_as_stars(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "guest:hunter22@127.0.0.1:5672/",
        "amqp:/guest:hunter22@127.0.0.1:5672/",
        "amqp://guest:hun#ter22@127.0.0.1/",
        "amqp://guest:12/hunter22@127.0.0.1/",
        "amqp://guest:12?hunter22@127.0.0.1/",
        "amqp://guest:hunter22@127.0.0.1:99999/",
        "amqp://guest:hunter22@[::1/",
        "hunter22",
    ],
)
def test_a_url_that_cannot_be_read_is_not_shown_at_all(url: str) -> None:
    assert redact_url(url) == UNREADABLE


def complaint(**setting: str) -> str:
    with pytest.raises(ValidationError) as refused:
        Settings(**setting)
    return describe(refused.value)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        (
            "database_url",
            "postgresql://u:hunter22@host:notaport/db",
            "the port must be a number from 1 to 65535",
        ),
        (
            "database_url",
            "postgresql://u:hunter22@host:0/db",
            "the port must be a number from 1 to 65535",
        ),
        ("database_url", "hunter22", "must start with postgresql:// or postgres://"),
        ("database_url", "mysql://u:hunter22@h/db", "must start with postgresql://"),
        (
            "amqp_url",
            "amqp://guest:hunter22@127.0.0.1:99999/",
            "the port must be a number from 1 to 65535",
        ),
        ("amqp_url", "http://x", "must start with amqp:// or amqps://"),
        ("amqp_url", "guest:hunter22@127.0.0.1/", "must start with amqp://"),
        ("amqp_url", "amqp:///", "must name a host"),
        ("amqp_url", "amqp://guest:12/hunter22@h/", "has an @ out of place"),
        ("database_url", "postgresql://u:hun@ter22@h/db", "has an @ out of place"),
        ("amqp_url", "amqp://guest:hunter22@[::1/", "cannot be read as a URL"),
    ],
)
def test_a_malformed_url_is_refused_by_setting_name_without_its_password(
    setting: str, value: str, message: str
) -> None:
    text = complaint(**{setting: value})

    assert text.startswith(f"NOTIFLOW_{setting.upper()}: {message}")
    assert "hunter22" not in text and "ter22" not in text
    assert "notaport" not in text


@pytest.mark.parametrize(
    "setting",
    [
        {"database_url": "postgresql://postgres@127.0.0.1:5432/notiflow"},
        {"database_url": "postgres://u:p%2Fq@db.example/notiflow?sslmode=require"},
        {"database_url": "postgresql:///notiflow?host=/var/run/postgresql"},
        {"database_url": "POSTGRESQL://u@h/db"},
        {"amqp_url": "amqp://guest:guest@127.0.0.1:5672/"},
        {"amqp_url": "amqps://u:p%23q@[::1]:5671/%2F?heartbeat=30"},
    ],
)
def test_the_urls_a_deployment_uses_are_accepted(setting: dict[str, str]) -> None:
    assert Settings(**setting).model_dump(include=set(setting)) == setting


def test_a_settings_error_that_escapes_does_not_repeat_the_url() -> None:
    # As a tool that builds Settings() itself would print it, in a traceback.
    with pytest.raises(ValidationError) as refused:
        Settings(amqp_url="amqp://guest:hunter22@127.0.0.1:99999/")

    assert "hunter22" not in str(refused.value)
    assert "amqp_url" in str(refused.value)
