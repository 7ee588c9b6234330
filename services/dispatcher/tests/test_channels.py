from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dispatcher.channels import DEFAULT_PATH, ChannelConfigs, ConfigError, parse


def write(path: Path, data: object, bump: int) -> None:
    path.write_text(json.dumps(data))
    # Make the change visible even on filesystems with coarse timestamps.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))


def config(types: list[str], priority: int = 5) -> dict[str, object]:
    return {
        "channels": {
            "comment.reply": {
                "types": types,
                "template": "comment_reply",
                "priority": priority,
            }
        }
    }


def test_shipped_configuration_is_valid() -> None:
    shipped = parse(DEFAULT_PATH.read_text())

    assert {"comment.reply", "comment.mention"} <= set(shipped.channels)


def test_changes_to_the_file_apply_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["email"]), bump=0)
    configs = ChannelConfigs(path)
    assert configs.current().channels["comment.reply"].types == ("email",)

    write(path, config(["email", "sse"], priority=9), bump=1)

    reloaded = configs.current().channels["comment.reply"]
    assert reloaded.types == ("email", "sse")
    assert reloaded.priority == 9


def test_a_broken_edit_keeps_the_last_good_configuration(tmp_path: Path) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["sse"]), bump=0)
    configs = ChannelConfigs(path)

    write(path, config(["carrier-pigeon"]), bump=1)

    assert configs.current().channels["comment.reply"].types == ("sse",)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (config([]), "types"),
        (config(["email"], priority=12), "priority"),
        (
            {
                "channels": {
                    "x": {
                        "types": ["sse"],
                        "template": "a",
                        "priority": 1,
                        "colour": "red",
                    }
                }
            },
            "colour",
        ),
    ],
)
def test_invalid_configuration_names_the_field(data: object, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        parse(json.dumps(data))
