"""Channel configuration, read from a JSON file and re-read when the file changes.

The file maps a channel name to the channel types it goes out on, the template that
renders it and its priority::

    {"channels": {"comment.mention": {"types": ["email", "sse"],
                                      "template": "comment_mention",
                                      "priority": 8, "enabled": true}}}

The channels are those the dispatcher knows, :data:`KNOWN`; one the file leaves
out is off, as if disabled.

Operators edit the file while the dispatcher runs; the next event uses the new
configuration. A file that cannot be read, does not parse or validate, names a
channel the dispatcher does not know or a template set the templates directory does
not hold is refused with a logged error and the last good configuration stays in
force, so a typo never stops deliveries. Each refusal is logged once: again only
when the file changes, or goes missing, or comes back. At start there is no last
good configuration: the same faults stop the dispatcher.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)

DEFAULT_PATH = Path(__file__).with_name("channel_configs.json")

# Notifies the post's author and the thread's participants.
REPLY = "comment.reply"
# Notifies the people @mentioned; where it and the reply channel both apply to a
# recipient, it wins for the types it delivers.
MENTION = "comment.mention"
KNOWN = (MENTION, REPLY)


class ChannelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    types: tuple[Literal["email", "sse", "push"], ...] = Field(min_length=1)
    template: str = Field(pattern=r"^[a-z0-9_]+$")
    priority: int = Field(ge=0, le=9)
    enabled: bool = True


class ChannelFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: dict[str, ChannelConfig]


class ConfigError(Exception):
    """The channel configuration file cannot be used."""


# Why a template set cannot be used, or None if it can:
# :meth:`dispatcher.templates.Renderer.problem`.
TemplateCheck = Callable[[str], str | None]


def parse(text: str | bytes, source: str = "channel configuration") -> ChannelFile:
    try:
        config = ChannelFile.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            ": ".join(
                part
                for part in (".".join(str(p) for p in err["loc"]), err["msg"])
                if part
            )
            for err in exc.errors(include_input=False, include_url=False)
        )
        raise ConfigError(f"{source} is invalid: {problems}") from None
    # A misspelt name would otherwise switch its channel off without a word.
    unknown = [name for name in config.channels if name not in KNOWN]
    if unknown:
        raise ConfigError(
            f"{source} is invalid: unknown channel {', '.join(map(repr, unknown))}"
            f"; the known channels are {', '.join(map(repr, KNOWN))}"
        )
    return config


def read(path: Path, templates: TemplateCheck) -> ChannelFile:
    """The configuration in ``path``, or :class:`ConfigError` saying what is wrong."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror or exc}") from None
    config = parse(text, str(path))
    for name, channel in config.channels.items():
        problem = templates(channel.template)
        if problem is not None:
            raise ConfigError(
                f"{path}: channel {name!r} names template "
                f"{channel.template!r}, which is unusable: {problem}"
            )
    return config


# What tells one version of the file from another: its modification time and size.
Stamp = tuple[int, int]


def _stamp(path: Path) -> Stamp:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size)


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
        stamp = _stamp(path)
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror or exc}") from None
    return Loaded(read(path, templates), stamp)


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

    def current(self) -> ChannelFile:
        try:
            stamp = _stamp(self._path)
        except OSError as exc:
            if self._stamp is not None:
                self._stamp = None
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
        try:
            self._config = read(self._path, self._templates)
        except ConfigError as exc:
            logger.error(
                "%s; keeping the last configuration",
                exc,
                extra={"action": "channels.reload_failed"},
            )
            return self._config
        logger.info(
            "channel configuration reloaded from %s",
            self._path,
            extra={"action": "channels.reloaded"},
        )
        return self._config
