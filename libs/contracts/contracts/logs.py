"""JSON logs, one object a line, carrying the ids an operator searches by.

Handlers are configured once, by :func:`configure`, at a service's entrypoint.
Consumers bind ``event_id`` / ``notification_id`` for the message they are handling
with :func:`bind`; every record logged meanwhile carries them.

Above DEBUG, anything shaped like an email address or a bearer token is masked in
the message and in exception text: SMTP replies and library errors quote addresses,
and an operator's log store is no place for them.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from contracts.tracing import current_trace_id

_bound: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "notiflow_log_context", default=None
)
_service = "notiflow"

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's copy of the message with terminal colours
}

# Loggers whose records tell of a connection, from tasks a library starts of its
# own (asyncpg's pool restoring its minimum after an outage). Such a task inherits
# whatever context it was started from, the ids and trace of a message handled
# earlier, which would only mislead: their records carry neither, and a failed
# attempt's exception as one line, for the next one is only seconds away.
_CONNECTION_LOGGERS = ("asyncpg.pool", "contracts.broker")

# An address starts a word, and not right after "//": the user of a URL such as
# postgresql://postgres@db.example/notiflow is no address, and masking it would
# hide the host the message is about (a password there is masked on its own).
_EMAIL = re.compile(r"(?<!//)(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_TOKEN = re.compile(r"eyJ[\w-]*\.[\w-]+\.[\w-]+")


def redact(text: str) -> str:
    """``text`` with email addresses and JWTs masked."""
    return _TOKEN.sub("<token>", _EMAIL.sub("<email>", text))


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Attach ``fields`` to every record logged inside the block."""
    token = _bound.set({**(_bound.get() or {}), **fields})
    try:
        yield
    finally:
        _bound.reset(token)


def bound() -> dict[str, Any]:
    """The fields :func:`bind` has attached in the current context."""
    return dict(_bound.get() or {})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "service": _service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        sensitive = record.levelno > logging.DEBUG
        of_connection = record.name in _CONNECTION_LOGGERS
        if not of_connection:
            entry.update(_bound.get() or {})
            trace_id = current_trace_id()
            if trace_id:
                entry["trace_id"] = trace_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and of_connection:
            entry["exc"] = repr(record.exc_info[1])
        elif record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if sensitive:
            for key in ("message", "exc"):
                if key in entry:
                    entry[key] = redact(entry[key])
        return json.dumps(entry, default=str, ensure_ascii=False)


def service() -> str:
    """The name this process logs under (``notiflow`` until :func:`configure`)."""
    return _service


def configure(service: str, level: str = "INFO") -> None:
    global _service
    _service = service
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log would print query strings, and SSE tokens travel there.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("uvicorn.error").propagate = True
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # httpx logs every request's URL at INFO, and a push endpoint's URL is the
    # device's secret (a push service's registration token is part of it); the
    # push sender names subscriptions by id instead. At DEBUG, as everything else,
    # it is shown.
    quiet = logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    for client in ("httpx", "httpcore"):
        logging.getLogger(client).setLevel(quiet)


_broker_logger = logging.getLogger("contracts.broker")


class BrokerLink:
    """Logs the drops and recoveries of one connection to RabbitMQ, under the name
    the broker shows for it (``connection_name``), for an operator to pair them up:
    one warning when it drops, however many attempts the reconnecting takes, and
    one line when it is back.

    :meth:`watch` an aio-pika robust connection, or give :meth:`lost` and
    :meth:`restored` to FastStream's ``on_close`` and ``on_reconnected``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._down = False

    def watch(self, connection: Any) -> None:
        connection.close_callbacks.add(self.lost)
        connection.reconnect_callbacks.add(self.restored)

    def lost(self, connection: Any, exc: BaseException | None = None) -> None:
        # Also called for every attempt that fails while reconnecting, and for
        # this process closing the connection on its way out.
        if connection.close_called or self._down:
            return
        self._down = True
        _broker_logger.warning(
            "broker connection %r lost (%s); reconnecting every %s s",
            self.name,
            _reason(exc),
            connection.reconnect_interval,
            extra={"action": "broker.connection_lost", "connection": self.name},
        )

    def restored(self, connection: Any) -> None:
        self._down = False
        _broker_logger.info(
            "broker connection %r restored",
            self.name,
            extra={"action": "broker.connection_restored", "connection": self.name},
        )


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    if isinstance(exc, asyncio.CancelledError):
        # aiormq ends a connection whose broker stopped answering heartbeats by
        # cancelling it, with nothing more to say.
        return "cut off with no reason given, as when the broker stops answering"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _RoutineRecovery(logging.Filter):
    """Takes records the broker clients write as errors, or with a traceback, for
    steps of a recovery that goes as it should down to DEBUG.

    * aiormq logs a connection the broker closed as an ERROR, then the reason again
      as a warning with the reader's traceback; a connection that broke, that
      warning alone; and each attempt to reconnect that fails, an ERROR beside
      aio-pika's own warning for it (which stays).
    * aio-pika's robust channels try to reopen themselves the moment their
      connection drops, before it is back, and each such attempt is logged as an
      ERROR; the connection reopens them once it has reconnected.

    :class:`BrokerLink` says what the operator needs: which connection dropped,
    why, and when it is back.
    """

    def __init__(self, routine: Any) -> None:
        super().__init__()
        self._routine = routine

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not self._routine(record):
            return True
        record.levelno = logging.DEBUG
        record.levelname = "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _connection_dropped(record: logging.LogRecord) -> bool:
    from aiormq.exceptions import AMQPConnectionError

    if record.msg.startswith(
        ("Unexpected connection close from remote", "error when creating transport")
    ):
        return True
    return (
        record.msg.startswith("Cancelling cause reader exited abnormally")
        and record.exc_info is not None
        and isinstance(record.exc_info[1], AMQPConnectionError)
    )


def _channel_reopened_too_early(record: logging.LogRecord) -> bool:
    # A channel the broker closed on a live connection (a refused operation) fails
    # to reopen with an AMQP error, not this.
    args = record.args if isinstance(record.args, tuple) else ()
    return (
        record.msg.startswith("Callback ")
        and len(args) == 3
        and isinstance(args[2], RuntimeError)
        and "RobustChannel._on_close" in repr(args[0])
    )


_ROUTINE_RECOVERY = {
    "aiormq.connection": _RoutineRecovery(_connection_dropped),
    "aio_pika.tools": _RoutineRecovery(_channel_reopened_too_early),
}
# On the loggers themselves, so that they hold wherever the records go.
for _name, _routine in _ROUTINE_RECOVERY.items():
    logging.getLogger(_name).addFilter(_routine)
