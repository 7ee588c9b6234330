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
from contracts.settings import Settings, describe, load_or_exit, redact_url

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


BROKEN = "has a % that starts no %XX escape (two hexadecimal digits)"
NUL = "has %00, a NUL character,"
NOT_UTF8 = "has %XX escapes that spell no UTF-8 text"


@pytest.mark.parametrize(
    ("url", "problem", "part"),
    [
        ("amqp://guest:gu%ZZhunter22@127.0.0.1:5672/", BROKEN, "password"),
        ("amqp://guest:hunter22%@h/", BROKEN, "password"),
        ("amqp://guest:hunter22%2@h/v", BROKEN, "password"),
        ("amqp://guest:hun%00ter22@h/", NUL, "password"),
        ("amqp://guest:hun%FFter22@h/", NOT_UTF8, "password"),
        ("amqp://gu%G1est:hunter22@h/", BROKEN, "user name"),
        ("amqps://guest:hunter22@h/notiflow%", BROKEN, "vhost"),
        ("amqp://guest:hunter22@h/v%00", NUL, "vhost"),
        ("amqp://guest:hunter22@h/caf%C3", NOT_UTF8, "vhost"),
    ],
)
def test_a_broker_url_with_a_broken_percent_escape_is_refused_without_its_password(
    url: str, problem: str, part: str
) -> None:
    # aio-pika's URL parser, yarl, reads such an escape as the characters written,
    # and the broker would then refuse a password nobody meant.
    text = complaint(amqp_url=url)

    assert text == (
        f"NOTIFLOW_AMQP_URL: {problem} in the {part}; write a % in the user name, "
        "password or vhost as %25"
    )
    assert "hunter22" not in text and "ter22" not in text


def test_a_broken_escape_in_the_broker_url_stops_a_service_at_start_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NOTIFLOW_AMQP_URL", "amqp://guest:gu%ZZhunter22@h:5672/")

    with pytest.raises(SystemExit) as stopped:
        load_or_exit(Settings)

    assert stopped.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("notiflow: invalid setting NOTIFLOW_AMQP_URL: has a % ")
    assert "hunter22" not in line


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
        {"amqp_url": "amqp://u:p%40ss%2Fw%25rd%20%C3%BC@mq.example/caf%C3%A9"},
        {"amqp_url": "amqp://u:p@mq.example/v?name=50%25%20off"},
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
