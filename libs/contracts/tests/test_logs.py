from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from contracts import logs
from contracts.logs import JsonFormatter, bind, configure


def record(level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("notiflow.test", level, __file__, 1, msg, args, None)


def test_a_line_is_one_json_object_with_the_bound_ids() -> None:
    with bind(event_id="e-1", notification_id="42"):
        line = JsonFormatter().format(record(logging.INFO, "sent %d", 1))

    entry = json.loads(line)
    assert entry["message"] == "sent 1"
    assert (entry["event_id"], entry["notification_id"]) == ("e-1", "42")
    assert entry["level"] == "info"


def test_addresses_and_tokens_are_masked_above_debug() -> None:
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    text = "SMTP 550 <bob.smith+x@mail.example.com> refused; token %s"

    info = json.loads(JsonFormatter().format(record(logging.WARNING, text, token)))
    debug = json.loads(JsonFormatter().format(record(logging.DEBUG, text, token)))

    assert "example.com" not in info["message"] and token not in info["message"]
    assert info["message"] == "SMTP 550 <<email>> refused; token <token>"
    assert (
        token in debug["message"] and "bob.smith+x@mail.example.com" in debug["message"]
    )


def test_the_user_of_a_url_is_not_masked_as_an_address() -> None:
    text = (
        "the database at postgresql://postgres@127.0.0.1:5432/notiflow lacks "
        "migrations; mail admin@ops.example.com"
    )

    info = json.loads(JsonFormatter().format(record(logging.ERROR, text)))

    assert info["message"] == (
        "the database at postgresql://postgres@127.0.0.1:5432/notiflow lacks "
        "migrations; mail <email>"
    )


def test_a_pool_restoring_connections_logs_no_stale_ids_and_no_traceback() -> None:
    # asyncpg's pool restores its minimum in a task of its own, started from the
    # context of whatever message was being handled when the connection died.
    try:
        raise ConnectionRefusedError(111, "Connect call failed")
    except ConnectionRefusedError as exc:
        failed = logging.LogRecord(
            "asyncpg.pool",
            logging.WARNING,
            __file__,
            1,
            "Failed to restore the pool connection floor; retrying",
            (),
            (type(exc), exc, exc.__traceback__),
        )
    with bind(event_id="e-1", notification_id="42"):
        entry = json.loads(JsonFormatter().format(failed))

    assert "event_id" not in entry and "notification_id" not in entry
    assert entry["exc"] == "ConnectionRefusedError(111, 'Connect call failed')"


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    clients = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    yield
    root.handlers[:], level = saved
    root.setLevel(level)
    for name, was in clients.items():
        logging.getLogger(name).setLevel(was)


@pytest.mark.usefixtures("restored_logging")
@pytest.mark.parametrize(("level", "shown"), [("INFO", False), ("DEBUG", True)])
def test_request_urls_of_the_http_client_are_logged_only_at_debug(
    capsys: pytest.CaptureFixture[str], level: str, shown: bool
) -> None:
    # A push endpoint: the path is the device's registration with its service.
    endpoint = "https://push.example.net/send/dQw4w9WgXcQ-device-secret"
    configure("push-sender", level)
    transport = httpx.MockTransport(lambda request: httpx.Response(201))
    with httpx.Client(transport=transport) as client:
        assert client.post(endpoint).status_code == 201

    assert ("dQw4w9WgXcQ-device-secret" in capsys.readouterr().out) is shown


def test_a_broker_connection_cut_off_without_a_reason_is_logged_in_words(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Connection:
        close_called = False
        reconnect_interval = 5.0

    link = logs.BrokerLink("dispatcher consumers")
    with caplog.at_level("WARNING", logger="contracts.broker"):
        link.lost(Connection(), asyncio.CancelledError())
        link.lost(Connection(), asyncio.CancelledError())  # a failed attempt
        link.restored(Connection())
        link.lost(Connection(), ConnectionResetError(104, "Connection reset by peer"))

    lost = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert lost == [
        "broker connection 'dispatcher consumers' lost (cut off with no reason "
        "given, as when the broker stops answering); reconnecting every 5.0 s",
        "broker connection 'dispatcher consumers' lost (ConnectionResetError: "
        "[Errno 104] Connection reset by peer); reconnecting every 5.0 s",
    ]
