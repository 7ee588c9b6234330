"""Channel configuration, read from a JSON file and re-read when the file changes.

The file maps a channel name to the channel types it goes out on, the template that
renders it and its priority::

    {"channels": {"comment.mention": {"types": ["email", "sse"],
                                      "template": "comment_mention",
                                      "priority": 8, "enabled": true}}}

The channels are those the dispatcher knows, :data:`KNOWN`; one the file leaves
out is off, as if disabled.

The file is UTF-8, with or without the byte order mark some editors write first.
Operators edit it while the dispatcher runs; the next event uses the new
configuration. The dispatcher also looks at it every second between events (see
:meth:`dispatcher.service.Dispatcher.refresh`), so that every dispatcher reading
the file keeps the same last good configuration. A file that cannot be read, is
not UTF-8, does not parse or validate, gives a key twice in one object, names a
channel the dispatcher does not know or a template set the templates directory
does not hold is refused with a logged error naming the channel and field, and the
last good configuration stays in force, so a typo never stops deliveries. A value
must have the JSON type its field takes: ``"enabled": "false"`` or ``"priority":
true`` is refused, not read as some other value. Each refusal is logged once:
again only when the file changes, or goes missing, or comes back. At start there
is no last good configuration: the same faults stop the dispatcher.

``{"channels": {}}`` is used, as an operator may mean it, with a warning at each
load that no event notifies anyone.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails

from contracts import jsonkeys, metrics
from dispatcher import stamps
from dispatcher.stamps import Stamp

logger = logging.getLogger(__name__)

DEFAULT_PATH = Path(__file__).with_name("channel_configs.json")

# Notifies the post's author and the thread's participants.
REPLY = "comment.reply"
# Notifies the people @mentioned; where it and the reply channel both apply to a
# recipient, it wins for the types it delivers.
MENTION = "comment.mention"
KNOWN = (MENTION, REPLY)


ChannelType = Literal["email", "sse", "push"]
MAX_TEMPLATE_CHARS = 100


class ChannelConfig(BaseModel):
    # Strict: lax validation would read "false" as false and true as priority 1.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    types: tuple[ChannelType, ...] = Field(min_length=1)
    # A folder's name, which file systems allow up to 255 bytes.
    template: str = Field(pattern=r"^[a-z0-9_]+$", max_length=MAX_TEMPLATE_CHARS)
    priority: int = Field(ge=0, le=9)
    enabled: bool = True

    @field_validator("types")
    @classmethod
    def _once_each(cls, types: tuple[str, ...]) -> tuple[str, ...]:
        # Said twice, a type could be an edit half done: which was meant?
        for index, kind in enumerate(types):
            if kind in types[:index]:
                raise ValueError(f"names {kind!r} twice in 'types'")
        return types


class ChannelFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: dict[str, ChannelConfig]


# Unknown channels an error names, at most; a file may hold any number.
NAMED = 10


class ConfigError(Exception):
    """The channel configuration file cannot be used."""


class UnusableTemplate(ConfigError):
    """The file names a template set that cannot be used now; it may be later."""

    def __init__(self, message: str, config: ChannelFile) -> None:
        super().__init__(message)
        self.config = config  # what the file says, refused for its templates


# Why a template set cannot be used, or None if it can:
# :meth:`dispatcher.templates.Renderer.problem`.
TemplateCheck = Callable[[str], str | None]


def parse(text: str | bytes, source: str = "channel configuration") -> ChannelFile:
    if isinstance(text, bytes):
        text = _decode(text, source)
    if not text.strip():
        raise ConfigError(f"{source} is empty; it must hold {_SHAPE}")
    # Read into a dict, a key given twice would keep one copy without a word.
    repeated = jsonkeys.repeated_keys(text)
    if repeated:
        raise ConfigError(f"{source} is invalid: {'; '.join(map(_repeated, repeated))}")
    try:
        config = ChannelFile.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(_problems(exc.errors(include_url=False)))
        raise ConfigError(f"{source} is invalid: {problems}") from None
    # A misspelt name would otherwise switch its channel off without a word.
    unknown = [name for name in config.channels if name not in KNOWN]
    if unknown:
        named = ", ".join(map(repr, unknown[:NAMED]))
        if len(unknown) > NAMED:
            named += f" and {len(unknown) - NAMED} more"
        raise ConfigError(
            f"{source} is invalid: unknown channel {named}"
            f"; the known channels are {', '.join(map(repr, KNOWN))}"
        )
    return config


_SHAPE = '{"channels": {<channel name>: {"types": [...], ...}}}'
_TYPES = get_args(ChannelType)
_FIELDS = tuple(ChannelConfig.model_fields)
# What each field of a channel takes, for the errors that name the field.
_ALLOWED = {
    "types": f"a list of one or more of {', '.join(map(repr, _TYPES))}",
    "template": (
        f"the name of a template set: up to {MAX_TEMPLATE_CHARS} lower-case "
        "letters, digits and _"
    ),
    "priority": "a whole number from 0 to 9",
    "enabled": "true or false",
}


def _decode(data: bytes, source: str) -> str:
    """The text of the file: UTF-8, after the byte order mark some editors
    write first."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ConfigError(
            f"{source} is not UTF-8 text: it starts with a UTF-16 byte order "
            "mark; save it as UTF-8"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{source} is not UTF-8 text: line {line} holds the byte "
            f"0x{exc.object[exc.start]:02x}, which UTF-8 does not allow there; "
            "save it as UTF-8"
        ) from None


def _repeated(found: tuple[tuple[str, ...], str]) -> str:
    at, key = found
    match at:
        case ():
            return f"{key!r} is given more than once"
        case ("channels",):
            return f"channel {key!r} is given more than once"
        case ("channels", name):
            return f"channel {name!r} gives {key!r} more than once"
    return f"{key!r} is given more than once in {'.'.join(at)}"


def _problems(errors: list[ErrorDetails]) -> list[str]:
    """One phrase per error, naming the channel and field and what they take."""
    # A list of one unknown type fails twice, the type and the list then empty;
    # only the first says what is wrong.
    return [
        _problem(err)
        for err in errors
        if not any(
            other["loc"][: len(err["loc"])] == err["loc"]
            and len(other["loc"]) > len(err["loc"])
            for other in errors
        )
    ]


def _problem(err: ErrorDetails) -> str:
    kind, given = err["type"], _shown(err.get("input"))
    match err["loc"]:
        case () if kind == "json_invalid":
            return err["msg"]
        case ():
            return f"the file must hold {_SHAPE}, not {given}"
        case ("channels",) if kind == "missing":
            return f"'channels' is missing; the file must hold {_SHAPE}"
        case ("channels",):
            return f"'channels' must be an object of channel names, not {given}"
        case (str(key),) if kind == "extra_forbidden":
            return f"unknown key {key!r} at the top level, which holds only 'channels'"
        case ("channels", str(name)):
            return (
                f"channel {name!r} must be an object of "
                f"{', '.join(map(repr, _FIELDS))}, not {given}"
            )
        case ("channels", str(name), str(field)) if kind == "extra_forbidden":
            return (
                f"channel {name!r} has unknown field {field!r}; the fields are "
                f"{', '.join(map(repr, _FIELDS))}"
            )
        case ("channels", str(name), str(field)) if (
            kind == "missing" and field in _ALLOWED
        ):
            return f"channel {name!r} lacks {field!r}, {_ALLOWED[field]}"
        case ("channels", str(name), "types") if kind == "value_error":
            return f"channel {name!r} {err['ctx']['error']}"
        case ("channels", str(name), "types", int()):
            return (
                f"channel {name!r} names unknown type {given} in 'types'; "
                f"the types are {', '.join(map(repr, _TYPES))}"
            )
        case ("channels", str(name), str(field)) if field in _ALLOWED:
            return (
                f"channel {name!r} has {field!r} {given}; it must be {_ALLOWED[field]}"
            )
    return f"{'.'.join(map(str, err['loc']))}: {err['msg']}"


def _shown(value: Any) -> str:
    """``value`` as the file gives it, cut short."""
    shown = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return shown if len(shown) <= 40 else f"{shown[:37]}..."


def read(path: Path, templates: TemplateCheck) -> ChannelFile:
    """The configuration in ``path``, or :class:`ConfigError` saying what is wrong."""
    try:
        text = stamps.read_regular(path)
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror or exc}") from None
    config = parse(text, str(path))
    for name, channel in config.channels.items():
        problem = templates(channel.template)
        if problem is not None:
            raise UnusableTemplate(
                f"{path}: channel {name!r} names template "
                f"{channel.template!r}, which is unusable: {problem}",
                config,
            )
    return config


@dataclass(frozen=True)
class Loaded:
    """A usable configuration, and the stamp its file had just before it was read."""

    config: ChannelFile
    stamp: Stamp


def load(path: Path, templates: TemplateCheck) -> Loaded:
    """The configuration in ``path`` with its stamp, or :class:`ConfigError`.

    The stamp is taken first: a write that lands while the file is read leaves a
    newer stamp, and the next :meth:`ChannelConfigs.current` reads it.
    """
    try:
        stamp = stamps.stamp(path)
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror or exc}") from None
    loaded = Loaded(read(path, templates), stamp)
    _warn_if_empty(path, loaded.config)
    return loaded


def _warn_if_empty(path: Path, config: ChannelFile) -> None:
    """Say that a file naming no channel consumes every event and notifies nobody;
    it is used all the same, as an operator may mean it."""
    if not config.channels:
        logger.warning(
            "%s configures no channel, so no event notifies anyone",
            path,
            extra={"action": "channels.none"},
        )
    elif not any(channel.enabled for channel in config.channels.values()):
        logger.warning(
            "%s turns every channel off, so no event notifies anyone",
            path,
            extra={"action": "channels.none"},
        )


class ChannelConfigs:
    """The configuration in force; :meth:`current` re-reads the file if it changed.

    It starts from ``start``, a configuration already loaded from ``path``, or
    else loads it, raising :class:`ConfigError` if the file cannot be used.
    """

    def __init__(
        self, path: Path, templates: TemplateCheck, start: Loaded | None = None
    ) -> None:
        self._path = path
        self._templates = templates
        start = start or load(path, templates)
        self._config = start.config
        # None while the file cannot be found: reported once, and read again
        # whatever stamp it has when it comes back.
        self._stamp: Stamp | None = start.stamp
        # Why the version on disk was refused, while it is the one on disk, and
        # whether for a template set, which may be put right without an edit.
        self._refused: str | None = None
        self._for_templates = False

    def current(self) -> ChannelFile:
        try:
            stamp = stamps.stamp(self._path)
        except OSError as exc:
            if self._stamp is not None:
                self._stamp = None
                metrics.CONFIG_REFUSED.set(1)
                logger.error(
                    "cannot read %s, keeping the last configuration: %s",
                    self._path,
                    exc,
                    extra={"action": "channels.reload_failed"},
                )
            return self._config
        if stamp == self._stamp:
            return self._config
        # Taken before reading: an edit refused is complained of once, and a
        # write that lands while this one is read is read again next time.
        self._stamp = stamp
        self._refused = None  # a new version's refusal is logged, whatever it says
        return self._read()

    def recheck(self) -> ChannelFile:
        """:meth:`current`, and the version on disk read again if it was refused.

        A version may be refused for what lies outside it: a template set it names
        that is missing or broken at that moment. Once that is put right, the
        version is taken up without another edit. A refusal for the same reason
        is not logged again; a version refused for what it holds itself is not
        read again until it changes.
        """
        config = self.current()
        if not self._for_templates or self._stamp is None:
            return config
        return self._read()

    def _read(self) -> ChannelFile:
        try:
            self._config = read(self._path, self._templates)
        except ConfigError as exc:
            self._for_templates = isinstance(exc, UnusableTemplate)
            # Read again with nothing changed in it (a mounted volume's files all
            # replaced at once, say), the configuration in force is what the
            # file says, and the renderer logs the template's fault, which keeps
            # its last good version: only the template counts as broken.
            same = isinstance(exc, UnusableTemplate) and exc.config == self._config
            metrics.CONFIG_REFUSED.set(0 if same else 1)
            if str(exc) != self._refused:
                self._refused = str(exc)
                if same:
                    logger.debug("%s; the configuration in force is the same", exc)
                    return self._config
                logger.error(
                    "%s; keeping the last configuration",
                    exc,
                    extra={"action": "channels.reload_failed"},
                )
            return self._config
        self._refused = None
        self._for_templates = False
        metrics.CONFIG_REFUSED.set(0)
        logger.info(
            "channel configuration reloaded from %s",
            self._path,
            extra={"action": "channels.reloaded"},
        )
        _warn_if_empty(self._path, self._config)
        return self._config
