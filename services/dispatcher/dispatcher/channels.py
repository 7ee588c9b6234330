"""Channel configuration, read from a JSON file and re-read when the file changes.

The file maps a channel name to the channel types it goes out on, the template that
renders it and its priority::

    {"channels": {"comment.mention": {"types": ["email", "sse"],
                                      "template": "comment_mention",
                                      "priority": 8, "enabled": true}}}

Operators edit the file while the dispatcher runs; the next event uses the new
configuration. A file that does not parse or validate is refused with a logged error
and the last good configuration stays in force, so a typo never stops deliveries.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)

DEFAULT_PATH = Path(__file__).with_name("channel_configs.json")


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


def parse(text: str, source: str = "channel configuration") -> ChannelFile:
    try:
        return ChannelFile.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{source} is invalid: {problems}") from None


class ChannelConfigs:
    """The configuration in force; :meth:`current` re-reads the file if it changed."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._config = self._load()

    def _stat(self) -> tuple[int, int]:
        st = os.stat(self._path)
        return (st.st_mtime_ns, st.st_size)

    def _load(self) -> ChannelFile:
        stamp = self._stat()
        config = parse(self._path.read_text(encoding="utf-8"), str(self._path))
        self._stamp = stamp
        return config

    def current(self) -> ChannelFile:
        try:
            changed = self._stat() != self._stamp
        except OSError as exc:
            logger.error(
                "cannot read %s, keeping the last configuration: %s",
                self._path,
                exc,
                extra={"action": "channels.reload_failed"},
            )
            return self._config
        if changed:
            try:
                self._config = self._load()
                logger.info(
                    "channel configuration reloaded from %s",
                    self._path,
                    extra={"action": "channels.reloaded"},
                )
            except (OSError, ConfigError) as exc:
                self._stamp = self._stat()
                logger.error(
                    "%s; keeping the last configuration",
                    exc,
                    extra={"action": "channels.reload_failed"},
                )
        return self._config
