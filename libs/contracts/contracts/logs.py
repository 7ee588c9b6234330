"""JSON logs, one object a line, carrying the ids an operator searches by.

Handlers are configured once, by :func:`configure`, at a service's entrypoint.
Consumers bind ``event_id`` / ``notification_id`` for the message they are handling
with :func:`bind`; every record logged meanwhile carries them.

Above DEBUG, anything shaped like an email address or a bearer token is masked in
the message and in exception text: SMTP replies and library errors quote addresses,
and an operator's log store is no place for them.
"""

from __future__ import annotations

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
_CONNECTION_LOGGERS = ("asyncpg.pool",)

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
