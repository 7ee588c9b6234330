"""Settings a service refuses at start-up, naming them: a prefetch that cannot hold
one batch, a PORT or SMTP port that is no TCP port, a CORS origin no browser sends,
a database or broker URL that cannot be used, a broker URL option the clients do
not take; and what no message at start-up shows: a password."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from dispatcher.app import DispatcherSettings
from email_sender.app import EmailSettings
from sse_gateway.app import GatewaySettings
from tests.support import infra
from tests.support.processes import BIN

PY = sys.executable
ADMIN = str(BIN / "notiflow-admin")
DEVRUN = Path(__file__).parents[2] / "tools" / "devrun.py"


@pytest.mark.parametrize(
    ("settings", "prefix"),
    [
        (DispatcherSettings, "dispatcher"),
        (EmailSettings, "email"),
        (GatewaySettings, "sse"),
    ],
)
def test_a_prefetch_below_the_batch_size_is_refused_naming_both(
    settings: type, prefix: str
) -> None:
    with pytest.raises(ValueError) as refused:
        settings(**{f"{prefix}_prefetch": 5, f"{prefix}_batch_size": 6})

    message = str(refused.value)
    assert f"NOTIFLOW_{prefix.upper()}_PREFETCH (5)" in message
    assert f"NOTIFLOW_{prefix.upper()}_BATCH_SIZE (6)" in message


def test_the_email_sender_exits_2_on_a_prefetch_below_its_batch() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "email_sender"],
        env={
            "PATH": "/usr/bin:/bin",
            "NOTIFLOW_EMAIL_PREFETCH": "5",
            "NOTIFLOW_EMAIL_BATCH_SIZE": "25",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert "NOTIFLOW_EMAIL_PREFETCH (5) must be at least" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("env", "named"),
    [
        (
            {"NOTIFLOW_DB_POOL_MIN": "20", "NOTIFLOW_DB_POOL_MAX": "5"},
            "NOTIFLOW_DB_POOL_MIN",
        ),
        ({"NOTIFLOW_LOG_LEVEL": "LOUD"}, "log_level"),
        ({"NOTIFLOW_DB_COMMAND_TIMEOUT": "inf"}, "db_command_timeout"),
        ({"NOTIFLOW_DRAIN_SECONDS": "nan"}, "drain_seconds"),
        (
            {"NOTIFLOW_CORS_ORIGINS": "https://app.example/app"},
            "NOTIFLOW_CORS_ORIGINS: 'https://app.example/app' has a path",
        ),
        (
            {"NOTIFLOW_PUBLIC_URL": "not a url"},
            "NOTIFLOW_PUBLIC_URL: must be an absolute http:// or https:// URL",
        ),
        ({"NOTIFLOW_DB_POOL_MAX": "100000000"}, "db_pool_max"),
        ({"NOTIFLOW_DISPATCHER_PREFETCH": "70000"}, "dispatcher_prefetch"),
        ({"NOTIFLOW_OUTBOX_BATCH_SIZE": "9" * 23}, "outbox_batch_size"),
        ({"NOTIFLOW_RETRY_DELAYS": "5," + "9" * 23}, "NOTIFLOW_RETRY_DELAYS"),
        ({"NOTIFLOW_TOKEN_TTL_SECONDS": "1e23"}, "token_ttl_seconds"),
        ({"NOTIFLOW_TOKEN_TTL_SECONDS": "40000000"}, "token_ttl_seconds"),
    ],
)
def test_a_number_or_level_a_service_cannot_use_exits_2_naming_it(
    env: dict[str, str], named: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert named.lower() in done.stderr.lower(), done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3, done.stderr


@pytest.mark.parametrize("port", ["abc", "0", "70000", "\u00b2"])
def test_a_port_that_is_no_tcp_port_is_refused_by_name(port: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "comments"],
        env={"PATH": "/usr/bin:/bin", "PORT": port},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert (
        f"invalid setting PORT: must be a TCP port from 1 to 65535, got {port!r}"
        in (done.stderr)
    )
    assert "Traceback" not in done.stderr


_HOST = "must be a host name or an IP address, such as smtp.example.com or 127.0.0.1"


@pytest.mark.parametrize(
    ("name", "value", "complaint"),
    [
        *(
            (
                "NOTIFLOW_SMTP_PORT",
                port,
                f"must be a TCP port from 1 to 65535, got {port}",
            )
            for port in ("0", "99999", "-25")
        ),
        *(
            ("NOTIFLOW_SMTP_HOST", host, f"{_HOST}, got {host!r}")
            for host in ("", "bad host", "smtp.example.com/25", "a..b")
        ),
    ],
)
def test_an_smtp_server_address_that_cannot_be_one_stops_the_email_sender(
    name: str, value: str, complaint: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "email_sender"],
        env={"PATH": "/usr/bin:/bin", name: value},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"notiflow: invalid setting {name}: {complaint}"
    ]


@pytest.mark.parametrize("port", ["0", "99999", "abc", "\u00b2"])
def test_make_run_refuses_an_smtp_port_no_sink_could_listen_on(
    port: str, tmp_path: Path
) -> None:
    # An empty --scripts makes a run that got past the check stop at once.
    done = subprocess.run(
        [sys.executable, str(DEVRUN), "--scripts", str(tmp_path)],
        env={"PATH": "/usr/bin:/bin", "NOTIFLOW_SMTP_PORT": port},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "devrun: invalid setting NOTIFLOW_SMTP_PORT: must be a TCP port from 1 "
        f"to 65535, got {port!r}"
    ]


@pytest.mark.parametrize(
    ("service", "name", "value", "complaint"),
    [
        (
            "comments",
            "NOTIFLOW_DATABASE_URL",
            "postgresql://u:hunter22@host:notaport/db",
            "the port must be a number from 1 to 65535",
        ),
        (
            "comments",
            "NOTIFLOW_DATABASE_URL",
            "not-a-url",
            "must start with postgresql:// or postgres://",
        ),
        (
            "dispatcher",
            "NOTIFLOW_AMQP_URL",
            "amqp://guest:hunter22@127.0.0.1:99999/",
            "the port must be a number from 1 to 65535",
        ),
        (
            "sse_gateway",
            "NOTIFLOW_AMQP_URL",
            "http://x",
            "must start with amqp:// or amqps://",
        ),
        (
            "comments",
            "NOTIFLOW_AMQP_URL",
            "amqp://guest:hun#ter22@127.0.0.1/",
            "the port must be a number from 1 to 65535",
        ),
    ],
)
def test_a_malformed_service_url_exits_2_naming_the_setting_not_the_password(
    service: str, name: str, value: str, complaint: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", service],
        env={"PATH": "/usr/bin:/bin", name: value},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert f"notiflow: invalid setting {name}: {complaint}" in done.stderr
    assert "Traceback" not in done.stderr
    assert "hunter22" not in done.stderr + done.stdout
    assert "ter22" not in done.stderr + done.stdout


@pytest.mark.parametrize("name", ["NOTIFLOW_API_BASE_URL", "NOTIFLOW_PUSH_BASE_URL"])
@pytest.mark.parametrize("value", ["not a url", "/api", "ftp://api.example"])
def test_a_web_page_url_that_is_no_absolute_http_url_stops_the_gateway_naming_it(
    name: str, value: str
) -> None:
    # The page would call a relative or malformed base and fail in every browser.
    done = subprocess.run(
        [PY, "-m", "sse_gateway"],
        env={"PATH": "/usr/bin:/bin", name: value},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"notiflow: invalid setting {name}: must be an absolute http:// or "
        "https:// URL, as in https://app.example"
    ]


@pytest.mark.parametrize(
    ("command", "query", "complaint"),
    [
        ([PY, "-m", "dispatcher"], "ssl=1", "query option 'ssl' is not an option"),
        ([PY, "-m", "comments"], "host=x", "query option 'host' belongs in the URL"),
        ([PY, "-m", "sse_gateway"], "heartbeat=soon", "query option 'heartbeat'"),
        ([PY, "-m", "email_sender"], "bogus=1", "query option 'bogus' is not one"),
        ([ADMIN, "dlq", "list"], "ssl=1", "query option 'ssl' is not an option"),
    ],
)
def test_a_broker_url_option_the_clients_cannot_take_exits_2_naming_it(
    command: list[str], query: str, complaint: str
) -> None:
    done = subprocess.run(
        command,
        env={
            "PATH": "/usr/bin:/bin",
            "NOTIFLOW_AMQP_URL": f"amqp://guest:hunter22@127.0.0.1:5672/?{query}",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("notiflow")]
    assert line.startswith(f"notiflow: invalid setting NOTIFLOW_AMQP_URL: {complaint}")
    assert line.endswith("(in amqp://guest:***@127.0.0.1:5672/)")
    assert "Traceback" not in done.stderr
    assert "hunter22" not in done.stderr + done.stdout


def test_unreachable_servers_are_named_with_their_passwords_as_stars() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "comments"],
        env={
            "PATH": "/usr/bin:/bin",
            "NOTIFLOW_DATABASE_URL": "postgresql://postgres:hunter22@127.0.0.1:1/x",
            "NOTIFLOW_AMQP_URL": "amqp://guest:hunter22@127.0.0.1:1/",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert "postgresql://postgres:***@127.0.0.1:1/x" in done.stderr
    assert "amqp://guest:***@127.0.0.1:1/" in done.stderr
    assert "hunter22" not in done.stderr + done.stdout


def test_the_sse_gateway_exits_2_on_a_database_an_older_release_migrated(
    amqp_url: str,
) -> None:
    name = infra.unique("notiflow_old")
    url = infra.database_url(name)
    try:
        infra.migrate_before(url, "0004")

        done = subprocess.run(
            [sys.executable, "-m", "sse_gateway"],
            env={
                "PATH": "/usr/bin:/bin",
                "NOTIFLOW_DATABASE_URL": url,
                "NOTIFLOW_AMQP_URL": amqp_url,
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        asyncio.run(infra.drop_database(name))

    assert done.returncode == 2, done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("notiflow: ")]
    assert "0004_inbox_unread_count" in line and "notiflow-migrate" in line
    assert "Traceback" not in done.stderr
