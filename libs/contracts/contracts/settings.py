"""Typed settings read from the environment, shared by every service.

Every variable carries the ``NOTIFLOW_`` prefix. The defaults work on a development
machine where PostgreSQL and RabbitMQ run locally; anything that would be unsafe in
production (the token signing secret) refuses to start outside development mode.
"""

from __future__ import annotations

import binascii
import ipaddress
import os
import re
import sys
import unicodedata
from base64 import b64decode
from collections.abc import Callable
from functools import lru_cache
from typing import Annotated, Literal, TypeVar
from urllib.parse import (
    SplitResult,
    parse_qsl,
    quote,
    unquote_to_bytes,
    urlsplit,
    urlunsplit,
)

import idna
from pydantic import (
    AfterValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts import logs

S = TypeVar("S")

# Where the SSE gateway serves the demo web page during development.
DEVELOPMENT_ORIGINS = ("http://127.0.0.1:8081", "http://localhost:8081")

DEV_SECRET = "dev-only-secret-change-me-0123456789abcdef"

DATABASE_URL_EXAMPLE = "postgresql://user:password@host:5432/notiflow"
AMQP_URL_EXAMPLE = "amqp://user:password@host:5672/vhost"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# The longest a bearer token may live: a year and a day. A token cannot be taken
# back before it expires (short of rotating the secret, which ends them all).
MAX_TOKEN_TTL_SECONDS = 366 * 24 * 3600
MAX_IDEMPOTENCY_KEY_HOURS = 366 * 24
MAX_COMMENTS_PER_MINUTE = 100_000
# A year: PostgreSQL's intervals reach much further, but not every float does.
MAX_PENDING_REPUBLISH_SECONDS = 366 * 24 * 3600
# Connections one pool may hold. PostgreSQL serves 100 by default, and each one
# costs the server a process; far more than that is a typing mistake.
MAX_POOL_CONNECTIONS = 1000
# AMQP's prefetch count is a 16-bit field.
MAX_PREFETCH = 65535
# Rows one outbox claim may take.
MAX_OUTBOX_BATCH = 100_000
# RabbitMQ's message TTL, which holds a retry's delay, is at most 2^32 - 1 ms.
MAX_RETRY_DELAY_SECONDS = (2**32 - 1) // 1000


_WHOLE_NUMBER = re.compile(r"-?[0-9]+")


def _tcp_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"must be a TCP port from 1 to 65535, got {value}")
    return value


# A port setting. Any int would do for pydantic, and a port of 0 or 99999 would
# fail only when a connection is tried, long after the service said it was ready.
TcpPort = Annotated[int, AfterValidator(_tcp_port)]


def _split_url(value: str) -> tuple[SplitResult, int | None] | None:
    """``value`` split as a URL, with its port (0 for one that is no TCP port, None
    for none given); None when it cannot be read as a URL at all."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    try:
        return parts, parts.port
    except ValueError:
        return parts, 0


def _web_url(value: str) -> str:
    wanted = "must be an absolute http:// or https:// URL, as in https://app.example"
    scheme, separator, _ = value.partition("://")
    if not separator or scheme.lower() not in ("http", "https"):
        raise ValueError(wanted)
    if any(c.isspace() for c in value):
        raise ValueError(f"{wanted}, with no spaces")
    split = _split_url(value)
    if split is None:
        raise ValueError(f"{wanted}; it cannot be read as one")
    parts, port = split
    if port == 0:
        raise ValueError(f"{wanted}; its port must be a number from 1 to 65535")
    if not parts.hostname:
        raise ValueError(f"{wanted}; it names no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{wanted}, with no user name or password in it")
    if "?" in value or "#" in value:
        raise ValueError(f"{wanted}, with no query or fragment")
    # Links go into email headers, which take ASCII and no angle brackets or
    # quotes, as well as into bodies and pages: every service writes the URL the
    # same way, as browsers would, a host in IDNA and the path %-encoded.
    host = parts.hostname or ""
    try:
        host = ascii_domain(host)
    except ValueError as exc:
        raise ValueError(f"{wanted}; its host {exc}") from None
    if not (_is_ip(host) or _is_url_host(host)):
        raise ValueError(
            f"{wanted}; its host must be an IP address or a name of labels of "
            "letters, digits, '-' and '_' between dots"
        )
    if _BROKEN_ESCAPE.search(parts.path):
        raise ValueError(f"{wanted}; each % in its path must start an escape, as %20")
    path = quote(parts.path, safe="/%!$&'()*+,;=:@-._~")
    if value.isascii() and path == parts.path:
        return value
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, path, "", ""))


# A host name's label as browsers take it (underscores too, as some internal
# names have them), and a % that starts no escape.
_URL_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_BROKEN_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _is_url_host(value: str) -> bool:
    labels = value.split(".")
    return (
        len(value) <= 253
        and all(_URL_LABEL.fullmatch(label) for label in labels)
        and not all(label.isdigit() for label in labels)
    )


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


# A URL people's browsers are sent to, such as the base of the links in
# notifications: a relative or malformed one would make every link a dead one.
# A host not in ASCII is written in IDNA, and other characters %-encoded.
WebUrl = Annotated[str, AfterValidator(_web_url)]


class Settings(BaseSettings):
    # Errors never repeat a value: it may be a secret, or a URL holding one, and
    # a tool that lets a ValidationError escape would print it.
    # Durations and sizes are finite: "inf" or "nan" would turn a timeout off.
    model_config = SettingsConfigDict(
        env_prefix="NOTIFLOW_",
        extra="ignore",
        hide_input_in_errors=True,
        allow_inf_nan=False,
    )

    env: Literal["development", "production", "test"] = "development"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/notiflow"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    secret_key: str = DEV_SECRET
    token_ttl_seconds: int = Field(
        default=7 * 24 * 3600, gt=0, le=MAX_TOKEN_TTL_SECONDS
    )

    db_pool_min: int = Field(default=1, ge=0, le=MAX_POOL_CONNECTIONS)
    db_pool_max: int = Field(default=10, ge=1, le=MAX_POOL_CONNECTIONS)
    db_acquire_timeout: float = Field(default=2.0, gt=0, le=3600)
    db_command_timeout: float = Field(default=10.0, gt=0, le=3600)

    outbox_batch_size: int = Field(default=500, ge=1, le=MAX_OUTBOX_BATCH)
    outbox_sweep_seconds: float = Field(default=2.0, ge=0.05, le=3600)
    # How long a relay waits before answering a NOTIFY, which only a writer without
    # a relay of its own sends (writers with one hand their rows to it), and how
    # old the rows that claim takes must be. 0 answers every NOTIFY at once.
    outbox_notify_delay_seconds: float = Field(default=0.2, ge=0, le=60)

    # How long the comments service remembers an Idempotency-Key, answering a
    # retry with the first response; a retry after that is a new comment.
    idempotency_key_hours: int = Field(default=24, ge=1, le=MAX_IDEMPOTENCY_KEY_HOURS)
    # How many comments one user may post in a minute, all at once or spread out;
    # past them, one more each 60/N seconds. 0 sets no limit.
    comments_per_minute: int = Field(default=30, ge=0, le=MAX_COMMENTS_PER_MINUTE)

    retry_delays: str = "5,30,120,600,3600"
    # A notification still pending this long (its message may have been lost with
    # a delivery queue) is published again by its sender's lease sweeper, at most
    # once per this period. Rows of a backlog that waits longer in its queue get a
    # duplicate message each period, which the claim lets through only once.
    pending_republish_seconds: float = Field(
        default=600.0, gt=0, le=MAX_PENDING_REPUBLISH_SECONDS
    )
    drain_seconds: float = Field(default=10.0, gt=0, le=3600)

    max_request_bytes: int = Field(default=64 * 1024, ge=1024)
    # How long a connection may take to send a request's headers; past it the
    # connection is closed (contracts.httpserver).
    http_headers_timeout: float = Field(default=20.0, gt=0, le=3600)
    # How long a request's body may take to arrive, once its headers have; past
    # it the request is answered 408 and its connection closed (contracts.http).
    http_body_timeout: float = Field(default=20.0, gt=0, le=3600)
    # Browser origins allowed to call the HTTP APIs, separated by commas.
    cors_origins: str = ""

    log_level: str = "INFO"

    @field_validator("*", mode="before")
    @classmethod
    def _whole_numbers_in_digits(cls, value: object, info: ValidationInfo) -> object:
        # Pydantic takes "1.0", "+5" and "1_000" for an int; a count or a port
        # written so is more likely a slip than meant.
        field = cls.model_fields.get(info.field_name or "")
        if (
            field is not None
            and field.annotation is int
            and isinstance(value, str)
            and not _WHOLE_NUMBER.fullmatch(value.strip())
        ):
            raise ValueError("must be a whole number, written in digits")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        url = check_url(value, ("postgresql", "postgres"), DATABASE_URL_EXAMPLE)
        return check_database_name(check_percent_escapes(url))

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        url = check_url(value, ("amqp", "amqps"), AMQP_URL_EXAMPLE, need_host=True)
        return check_amqp_options(check_amqp_escapes(url))

    @field_validator("cors_origins")
    @classmethod
    def _cors_origins(cls, value: str) -> str:
        # Origins are public, so a complaint names the entry it is about.
        entries = (entry.strip() for entry in value.split(","))
        return ",".join(browser_origin(entry) for entry in entries if entry)

    @property
    def allowed_origins(self) -> list[str]:
        """CORS origins; in development, by default, the demo page's own."""
        origins = [o.strip() for o in self.cors_origins.split(",") if o.strip()]
        if not origins and self.env == "development":
            return list(DEVELOPMENT_ORIGINS)
        return origins

    @property
    def retry_delay_levels(self) -> tuple[int, ...]:
        """Seconds to wait before each retry of a failed delivery, in order;
        ValueError unless each is plain digits (an empty one, between two commas
        or after the last, is a mistake, not nothing)."""
        parts = [part.strip() for part in self.retry_delays.split(",")]
        if not all(part.isascii() and part.isdigit() for part in parts):
            raise ValueError(self.retry_delays)
        return tuple(map(int, parts))

    @model_validator(mode="after")
    def _refuse_dev_secret(self) -> Settings:
        if self.env == "production" and self.secret_key == DEV_SECRET:
            raise ValueError(
                "NOTIFLOW_SECRET_KEY is the development default; set a real secret "
                "(at least 32 random characters) before running with "
                "NOTIFLOW_ENV=production"
            )
        try:
            delays = self.retry_delay_levels
        except ValueError:
            delays = ()
        if not delays or any(not 0 < d <= MAX_RETRY_DELAY_SECONDS for d in delays):
            raise ValueError(
                f"NOTIFLOW_RETRY_DELAYS: must be positive whole seconds, each at most "
                f"{MAX_RETRY_DELAY_SECONDS} (RabbitMQ's longest message TTL), "
                f"separated by commas, got {self.retry_delays!r}"
            )
        if self.env == "production" and len(self.secret_key) < 32:
            raise ValueError("NOTIFLOW_SECRET_KEY must be at least 32 characters long")
        if self.db_pool_min > self.db_pool_max:
            raise ValueError(
                f"NOTIFLOW_DB_POOL_MIN ({self.db_pool_min}) must not be above "
                f"NOTIFLOW_DB_POOL_MAX ({self.db_pool_max})"
            )
        return self


_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ORIGIN = "an origin is scheme://host[:port], as in https://app.example:8443"


def browser_origin(entry: str) -> str:
    """``entry`` written as a browser writes an ``Origin`` header, which CORS compares
    character for character: scheme and host in lower case, no default port, no
    trailing ``/``.

    ValueError naming the entry if it cannot be an origin: a path, a query, no
    scheme or no host would never match what a browser sends, and ``*`` is not
    taken (the gateway's streams answer listed origins only).
    """
    shown = repr(entry if len(entry) <= 60 else f"{entry[:60]}...")
    if entry == "*":
        raise ValueError(f"'*' is not taken: list each origin; {_ORIGIN}")
    scheme, separator, _ = entry.partition("://")
    if not separator or not _SCHEME.fullmatch(scheme.lower()):
        raise ValueError(f"{shown} has no scheme; {_ORIGIN}")
    if problem := _origin_problem(entry):
        raise ValueError(f"{shown} {problem}; {_ORIGIN}")
    split = _split_url(entry)
    if split is None:
        raise ValueError(f"{shown} cannot be read as a URL; {_ORIGIN}")
    parts, port = split
    if port == 0:
        raise ValueError(f"{shown} has a port that is no TCP port; {_ORIGIN}")
    if parts.path not in ("", "/"):
        raise ValueError(f"{shown} has a path; {_ORIGIN}")
    host = parts.hostname
    if not host:
        raise ValueError(f"{shown} names no host; {_ORIGIN}")
    scheme = scheme.lower()
    where = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        where = f"{where}:{port}"
    return f"{scheme}://{where}"


def _origin_problem(entry: str) -> str | None:
    if not entry.isascii():
        return "is not ASCII (write a host in its xn-- form)"
    if "?" in entry or "#" in entry:
        return "has a query or fragment"
    if "@" in entry:
        return "has a user name"
    if "\\" in entry or any(c.isspace() for c in entry):
        return "has a space or backslash in it"
    return None


_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def is_host(value: str) -> bool:
    """Whether ``value`` is an IP address, or a host name by its syntax alone:
    labels of ASCII letters, digits and hyphens between dots, the last not all
    digits (a resolver would read ``127.1`` as an IPv4 address). Nothing is
    looked up."""
    if _is_ip(value):
        return True
    labels = value.split(".")
    return (
        len(value) <= 253
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def ascii_domain(domain: str) -> str:
    """``domain`` as DNS and mail servers take it: as written if it is ASCII, else
    by IDNA 2008 with the UTS #46 mapping, so that ``Straße.example`` becomes
    ``xn--strae-oqa.example`` (Python's own ``idna`` codec, IDNA 2003, would
    make it ``strasse.example``, another domain).

    ValueError saying why it cannot be written so: a code point IDNA 2008
    disallows, or one UTS #46 would drop without a trace (a zero-width space,
    a soft hyphen), which would make it a domain other than the one written.
    """
    if domain.isascii():
        return domain
    try:
        for char in domain:
            if not idna.uts46_remap(char, std3_rules=False):
                named = f"U+{ord(char):04X} {unicodedata.name(char, '')}".rstrip()
                raise ValueError(
                    f"has {named}, which is invisible, and IDNA would drop it"
                )
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"cannot be written in IDNA 2008: {exc}") from None


def prefetch_holds_batch(service: str, prefetch: int, batch_size: int) -> None:
    """Refuse a prefetch below the batch size: batches are made of unacked messages,
    so the prefetch bounds how large one can get."""
    if prefetch < batch_size:
        name = service.upper()
        raise ValueError(
            f"NOTIFLOW_{name}_PREFETCH ({prefetch}) must be at least "
            f"NOTIFLOW_{name}_BATCH_SIZE ({batch_size})"
        )


# A / ? or # in a password ends the URL's host part early, so that the rest of
# the password is read as the port, the path or the query; asyncpg takes the
# first @ for the end of the password.
_ENCODE = "percent-encode any / ? # @ in the user name or password (%2F %3F %23 %40)"


def check_url(
    url: str, schemes: tuple[str, ...], example: str, *, need_host: bool = False
) -> str:
    """``url``, if it reads as a URL of one of ``schemes`` with a usable port.

    Else ValueError saying what is wrong, without repeating the URL or any part of
    it: a password may be in it, or, when the URL is malformed, in any part.
    """
    scheme, separator, _ = url.partition("://")
    if not separator or scheme.strip().lower() not in schemes:
        wanted = " or ".join(f"{name}://" for name in schemes)
        raise ValueError(f"must start with {wanted}, as in {example}")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(
            f"cannot be read as a URL (is an IPv6 host in [ ]?); {_ENCODE}"
        ) from None
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(
            f"the port must be a number from 1 to 65535; if it is, {_ENCODE}"
        )
    after_host = parts.path + parts.query + parts.fragment
    if parts.netloc.count("@") > 1 or "@" in after_host:
        raise ValueError(f"has an @ out of place; {_ENCODE}")
    if need_host and not parts.hostname:
        raise ValueError(f"must name a host, as in {example}")
    return url


# A % that does not start a %XX escape, and %00, which would decode to a NUL.
_BROKEN_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})|%00")


def check_percent_escapes(url: str) -> str:
    """``url``, if each % in it starts an escape libpq can decode.

    asyncpg reads a broken escape (``se%ZZcret``) as the characters written and
    libpq, under psycopg and ``notiflow-migrate``, refuses the whole URL, so
    the services and the migrations would disagree on the password, or one of
    them would fail. Else ValueError, repeating no part of the URL.
    """
    found = _BROKEN_ESCAPE.search(url)
    if found is None:
        return url
    if found.group() == "%00":
        problem = "has %00, a NUL character, which libpq refuses"
    else:
        problem = "has a % that starts no %XX escape (two hexadecimal digits)"
    raise ValueError(
        f"{problem}; write a % in the user name, password or database name as %25"
    )


def check_database_name(url: str) -> str:
    """``url``, if its path names the database, in UTF-8.

    With no name, asyncpg and libpq both connect to the database named after the
    user, which notiflow-migrate would neither create nor migrate. asyncpg reads
    a ``dbname`` or ``database`` in the query only when the URL has no path at
    all, and libpq takes ``dbname`` over the path and refuses ``database``: the
    services and the migrations would use two databases. Else ValueError,
    repeating no part of the URL.
    """
    parts = urlsplit(url)
    named = {name for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
    if named & {"dbname", "database"}:
        raise ValueError(
            "names the database in its query; name it in the path instead, as in "
            f"{DATABASE_URL_EXAMPLE}"
        )
    name = parts.path.removeprefix("/")
    if not name:
        raise ValueError(f"names no database; add one, as in {DATABASE_URL_EXAMPLE}")
    if problem := _escape_problem(name):
        raise ValueError(f"{problem} in the database name; write a % in it as %25")
    return url


def check_amqp_escapes(url: str) -> str:
    """``url``, if each % in its user name, password and vhost starts an escape
    of UTF-8 text, none of them a NUL.

    aio-pika reads the URL with yarl, which takes an escape it cannot decode
    (``gu%ZZest``, ``%FF``, a ``%`` at the end) as the characters written: the
    broker would be sent another password or vhost than the one meant, and the
    service would report a failed login. A NUL is what separates the user name
    from the password in the login the clients send. Else ValueError naming the
    part, repeating none of the URL.
    """
    parts = urlsplit(url)
    userinfo, _, _ = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    named = (("user name", user), ("password", password), ("vhost", parts.path))
    for name, text in named:
        if problem := _escape_problem(text):
            raise ValueError(
                f"{problem} in the {name}; write a % in the user name, password "
                "or vhost as %25"
            )
    return url


def _escape_problem(text: str) -> str | None:
    found = _BROKEN_ESCAPE.search(text)
    if found is not None and found.group() == "%00":
        return "has %00, a NUL character,"
    if found is not None:
        return "has a % that starts no %XX escape (two hexadecimal digits)"
    try:
        unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        return "has %XX escapes that spell no UTF-8 text"
    return None


# The options an AMQP URL's query may carry: those aiormq (heartbeat, name, auth
# and TLS) and aio-pika (the rest) read from it, each with what its value must
# be. The clients take the first of a repeated option and read a number they
# cannot parse as 0, and FastStream's broker rebuilds the URL by passing every
# option to aio-pika as a keyword argument, so that an option named like one of
# aio-pika's own arguments (host, ssl and the like) reaches it twice.
_WHOLE = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")
_TLS_OPTIONS = ("cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl")


def _heartbeat(value: str) -> str | None:
    if _WHOLE.fullmatch(value) and int(value) <= 65534:
        return None
    return "must be whole seconds from 0 to 65534 (0 turns heartbeats off)"


def _whole(value: str) -> str | None:
    return None if _WHOLE.fullmatch(value) else "must be a whole number, 0 or more"


def _seconds(value: str) -> str | None:
    if _DECIMAL.fullmatch(value) and float(value) > 0:
        return None
    return "must be a number of seconds above 0, such as 0.25 or 5"


def _text(value: str) -> str | None:
    return None


def _auth(value: str) -> str | None:
    if value.lower() in ("plain", "external"):
        return None
    return "must be plain or external"


def _file(value: str) -> str | None:
    return None if os.path.isfile(value) else "names no file that exists here"


def _directory(value: str) -> str | None:
    return None if os.path.isdir(value) else "names no directory that exists here"


def _base64(value: str) -> str | None:
    try:
        b64decode(value, validate=True)
    except binascii.Error:
        return "must be base64, with each + in it percent-encoded as %2B"
    return None


def _flag(value: str) -> str | None:
    return None if value in ("0", "1") else "must be 0 or 1"


AMQP_OPTIONS: dict[str, Callable[[str], str | None]] = {
    "heartbeat": _heartbeat,
    "name": _text,
    "auth": _auth,
    "cafile": _file,
    "capath": _directory,
    "cadata": _base64,
    "certfile": _file,
    "keyfile": _file,
    "no_verify_ssl": _flag,
    "interleave": _whole,
    "happy_eyeballs_delay": _seconds,
    "reconnect_interval": _seconds,
}

_IN_URL = f"belongs in the URL itself, as in {AMQP_URL_EXAMPLE}"
_USE_AMQPS = (
    "is not an option: for TLS use an amqps:// URL, with cafile, capath, cadata, "
    "certfile, keyfile or no_verify_ssl as options"
)
_USE_NAME = "is not an option: name the connection with name="
_OWN_TIMEOUT = "is not taken: notiflow bounds how long connecting may take itself"
# Options people reach for that the clients do not take from the query, or that
# notiflow passes itself, and what to do instead.
_NOT_OPTIONS = {
    "host": _IN_URL,
    "port": _IN_URL,
    "login": _IN_URL,
    "user": _IN_URL,
    "password": _IN_URL,
    "virtualhost": _IN_URL,
    "vhost": _IN_URL,
    "ssl": _USE_AMQPS,
    "ssl_options": _USE_AMQPS,
    "client_properties": _USE_NAME,
    "connection_name": _USE_NAME,
    "timeout": _OWN_TIMEOUT,
    "connection_timeout": _OWN_TIMEOUT,
    "fail_fast": "is not taken: notiflow always stops when it cannot reach the "
    "broker at start",
}


def amqp_options(url: str) -> dict[str, str]:
    """The options in the query of ``url``, decoded; the first of any repeated."""
    options: dict[str, str] = {}
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        options.setdefault(name, value)
    return options


def amqp_connection_name(url: str, role: str | None = None) -> str:
    """What this process calls its connection to the broker at ``url``: the URL's
    own ``name=`` if it gives one, else the service's name (and ``role``).

    RabbitMQ shows it as the ``connection_name`` client property, in its web UI
    and in ``rabbitmqctl list_connections client_properties``, as PostgreSQL
    shows a connection's ``application_name``.
    """
    return amqp_options(url).get("name") or logs.service() + (
        f" {role}" if role else ""
    )


def check_amqp_options(url: str) -> str:
    """``url``, if each option in its query is one the broker clients take, given
    once, with a value they can use.

    Else ValueError naming the option and showing the URL with its password as
    ``***``. It never repeats a value: one may be a secret put in the wrong place.
    """
    tls = urlsplit(url).scheme.lower() == "amqps"
    seen: dict[str, str] = {}
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if problem := _option_problem(name, value, seen, tls):
            shown = name if len(name) <= 40 else f"{name[:40]}..."
            raise ValueError(f"query option {shown!r} {problem} (in {redact_url(url)})")
        seen[name] = value
    if "keyfile" in seen and "certfile" not in seen:
        problem = "query option 'keyfile' needs a certfile beside it"
    elif seen.get("auth", "").lower() == "external" and "certfile" not in seen:
        problem = (
            "query option 'auth' of external needs an amqps:// URL with a certfile"
        )
    else:
        return url
    raise ValueError(f"{problem} (in {redact_url(url)})")


def _option_problem(
    name: str, value: str, seen: dict[str, str], tls: bool
) -> str | None:
    if name in _NOT_OPTIONS:
        return _NOT_OPTIONS[name]
    check = AMQP_OPTIONS.get(name)
    if check is None:
        known = ", ".join(sorted(AMQP_OPTIONS))
        return f"is not one the broker clients take; they take {known}"
    if name in seen:
        return "is given more than once"
    if value == "":
        return "has no value"
    if name in _TLS_OPTIONS and not tls:
        return "applies only to amqps:// URLs"
    return check(value)


def redact_url(url: str) -> str:
    """The URL for messages people see: its password as ``***``, no query.

    A URL that does not read as one is not shown at all, since its password could
    be in any part of it.
    """
    unreadable = "(a URL that cannot be read)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return unreadable
    # An @ past the host part means a / ? or # in the password ended the host
    # part early: what looks like a host and port there is the password's start.
    if (
        not parts.scheme
        or "://" not in url
        or "@" in parts.path + parts.query + parts.fragment
    ):
        return unreadable
    where = parts.hostname or ""
    if ":" in where:
        where = f"[{where}]"
    if port is not None:
        where = f"{where}:{port}"
    if parts.username is not None:
        secret = ":***" if parts.password is not None else ""
        where = f"{parts.username}{secret}@{where}"
    return f"{parts.scheme}://{where}{parts.path}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def describe(exc: ValidationError, prefix: str = "NOTIFLOW_") -> str:
    """What is wrong with the settings, one line per variable.

    Pydantic's own message repeats the input, and the input may be a secret.
    """
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        name = "_".join(str(p) for p in err["loc"]).upper()
        where = f"{prefix}{name}: " if name else ""
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}{message}")
    return "\n".join(lines)


class InvalidSetting(ValueError):
    """A setting that reads well but cannot be used, found while a service is
    built: a key file that cannot be read, say. ``problem`` must not repeat the
    value, which may be a secret."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


def load_or_exit(make: Callable[[], S]) -> S:
    """``make()``, or a readable complaint and exit status 2 if the settings are bad."""
    try:
        return make()
    except ValidationError as exc:
        for line in describe(exc).splitlines():
            print(f"notiflow: invalid setting {line}", file=sys.stderr)
        sys.exit(2)
    except InvalidSetting as exc:
        print(f"notiflow: invalid setting {exc}", file=sys.stderr)
        sys.exit(2)
