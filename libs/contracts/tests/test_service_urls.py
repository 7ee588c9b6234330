"""The database and broker URLs: which are refused, and how they are shown; the
options a broker URL may carry, and that the consumers' broker takes them."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from pydantic import ValidationError
from yarl import URL

from contracts import logs
from contracts.runtime import Runtime
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
    ("url", "message"),
    [
        ("postgresql://u:se%ZZhunter22@h/db", "has a % that starts no %XX escape"),
        ("postgresql://u:hunter22%@h/db", "has a % that starts no %XX escape"),
        ("postgresql://u:hunter22%2@h/db", "has a % that starts no %XX escape"),
        ("postgresql://u%G1:hunter22@h/db", "has a % that starts no %XX escape"),
        ("postgresql://u:hunter22@h/notiflow%", "has a % that starts no %XX escape"),
        ("postgresql://u:hun%00ter22@h/db", "has %00, a NUL character"),
    ],
)
def test_a_database_url_with_a_broken_percent_escape_is_refused_without_its_password(
    url: str, message: str
) -> None:
    text = complaint(database_url=url)

    assert text.startswith(f"NOTIFLOW_DATABASE_URL: {message}")
    assert text.endswith(
        "; write a % in the user name, password or database name as %25"
    )
    assert "hunter22" not in text and "ter22" not in text


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:se%ZZcret@h/db",
        "postgresql://u:se%00cret@h/db",
        "postgresql://u:50%25off@h/db",
        "postgresql://u:p%2Fq%3f@h/n%C3%B6tiflow",
    ],
)
def test_a_database_url_is_taken_only_if_the_migration_tool_can_read_it(
    url: str,
) -> None:
    # notiflow-migrate hands the URL to libpq (through psycopg), the services
    # to asyncpg, which reads a broken escape as the characters written.
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        libpq_reads_it = False
    else:
        libpq_reads_it = True

    try:
        Settings(database_url=url)
    except ValidationError:
        taken = False
    else:
        taken = True

    assert taken == libpq_reads_it


@pytest.mark.parametrize(
    "setting",
    [
        {"database_url": "postgresql://postgres@127.0.0.1:5432/notiflow"},
        {"database_url": "postgresql://u:50%25off@db.example/notiflow"},
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


BROKER = "amqp://guest:hunter22@127.0.0.1:5672/v"
TLS_BROKER = "amqps://guest:hunter22@mq.example:5671/v"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            f"{BROKER}?ssl=1",
            "query option 'ssl' is not an option: for TLS use an amqps",
        ),
        (f"{BROKER}?host=x", "query option 'host' belongs in the URL itself"),
        (f"{BROKER}?port=5673", "query option 'port' belongs in the URL itself"),
        (f"{BROKER}?virtualhost=x", "query option 'virtualhost' belongs in the URL"),
        (f"{BROKER}?client_properties=x", "query option 'client_properties' is not"),
        (f"{BROKER}?timeout=5", "query option 'timeout' is not taken: notiflow"),
        (f"{BROKER}?fail_fast=0", "query option 'fail_fast' is not taken"),
        (f"{BROKER}?bogus=1", "query option 'bogus' is not one the broker clients"),
        (f"{BROKER}?heartbeat=abc", "query option 'heartbeat' must be whole seconds"),
        (f"{BROKER}?heartbeat=65535", "query option 'heartbeat' must be whole"),
        (f"{BROKER}?heartbeat=-1", "query option 'heartbeat' must be whole"),
        (f"{BROKER}?heartbeat=3&heartbeat=4", "'heartbeat' is given more than once"),
        (f"{BROKER}?name=", "query option 'name' has no value"),
        (f"{BROKER}?heartbeat", "query option 'heartbeat' has no value"),
        (f"{BROKER}?reconnect_interval=0", "'reconnect_interval' must be a number"),
        (f"{BROKER}?happy_eyeballs_delay=1e3", "'happy_eyeballs_delay' must be"),
        (f"{BROKER}?interleave=x", "query option 'interleave' must be a whole number"),
        (f"{BROKER}?auth=kerberos", "query option 'auth' must be plain or external"),
        (f"{BROKER}?no_verify_ssl=1", "'no_verify_ssl' applies only to amqps:// URLs"),
        (f"{TLS_BROKER}?no_verify_ssl=yes", "'no_verify_ssl' must be 0 or 1"),
        (f"{TLS_BROKER}?cafile=/nonexistent", "'cafile' names no file that exists"),
        (f"{TLS_BROKER}?capath=/nonexistent", "'capath' names no directory that"),
        (f"{TLS_BROKER}?cadata=ab+c", "'cadata' must be base64, with each +"),
        (f"{TLS_BROKER}?auth=external", "'auth' of external needs an amqps:// URL"),
    ],
)
def test_a_broker_url_option_the_clients_cannot_take_is_refused_naming_it(
    url: str, message: str
) -> None:
    text = complaint(amqp_url=url)

    assert text.startswith("NOTIFLOW_AMQP_URL: query option '")
    assert message in text
    assert text.endswith(f"(in {redact_url(url)})")
    assert ":***@" in text and "hunter22" not in text


def test_a_key_file_without_its_certificate_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("key")

    text = complaint(amqp_url=f"{TLS_BROKER}?keyfile={key}")

    assert text.startswith("NOTIFLOW_AMQP_URL: query option 'keyfile' needs a certfile")


def test_a_broker_url_option_value_is_not_repeated() -> None:
    # A password pasted as an option's value stays out of the message.
    text = complaint(amqp_url=f"{BROKER}?password=hunter22&heartbeat=hunter22")

    assert "'password'" in text and "hunter22" not in text


def test_the_broker_url_options_aio_pika_documents_are_accepted(
    tmp_path: Path,
) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("pem")
    urls = [
        f"{BROKER}?heartbeat=30",
        f"{BROKER}?heartbeat=0&name=notiflow%20dispatcher&auth=plain",
        f"{BROKER}?interleave=1&happy_eyeballs_delay=0.25&reconnect_interval=2.5",
        f"{TLS_BROKER}?cafile={tmp_path}/ca.pem&certfile={tmp_path}/client.pem"
        f"&keyfile={tmp_path}/client.key&auth=EXTERNAL",
        f"{TLS_BROKER}?capath={tmp_path}&cadata=YWJj%2BwA%3D&no_verify_ssl=1",
    ]

    for url in urls:
        assert Settings(amqp_url=url).amqp_url == url


def test_the_consumers_broker_takes_every_accepted_option_once(
    tmp_path: Path,
) -> None:
    (tmp_path / "ca.pem").write_text("pem")
    urls = {
        f"{BROKER}?heartbeat=30&name=n&reconnect_interval=2.5": 2.5,
        f"{TLS_BROKER}?cafile={tmp_path}/ca.pem&no_verify_ssl=1&heartbeat=5": 5.0,
    }

    for url, interval in urls.items():
        broker = Runtime(Settings(amqp_url=url), consumers=True).broker

        # What FastStream will hand to aio-pika's connect_robust.
        assert broker is not None
        given = broker._connection_kwargs
        # The connection's name too, which only a URL without one lacks.
        expected = {"name": f"{logs.service()} consumers", **URL(url).query}
        assert dict(URL(given["url"]).query) == expected
        assert given["reconnect_interval"] == interval
