"""What the dispatcher refuses to start on: a channel configuration or a templates
directory it could not use, each named in one line, with exit status 2."""

from __future__ import annotations

import codecs
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from dispatcher import channels, templates
from dispatcher.app import DispatcherSettings, create_app


def start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def misspelt(tmp_path: Path) -> Path:
    path = tmp_path / "channels.json"
    text = channels.DEFAULT_PATH.read_text()
    path.write_text(text.replace('"comment_mention"', '"comment_mentionn"'))
    return path


def test_a_channel_naming_a_missing_template_is_refused_naming_both(
    tmp_path: Path,
) -> None:
    path = misspelt(tmp_path)

    with pytest.raises(ValidationError) as refused:
        DispatcherSettings(channel_config=path)

    message = str(refused.value)
    assert "channel 'comment.mention' names template 'comment_mentionn'" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("setting", "value", "complaint"),
    [
        (
            "NOTIFLOW_CHANNEL_CONFIG",
            "misspelt",
            "channel 'comment.mention' names template 'comment_mentionn', "
            "which is unusable: not found in",
        ),
        (
            "NOTIFLOW_CHANNEL_CONFIG",
            "misnamed",
            "is invalid: unknown channel 'comment.mentions'; "
            "the known channels are 'comment.mention', 'comment.reply'",
        ),
        (
            "NOTIFLOW_CHANNEL_CONFIG",
            "/nonexistent.json",
            "/nonexistent.json cannot be read: No such file or directory",
        ),
        (
            "NOTIFLOW_CHANNEL_CONFIG",
            "truncated",
            "is invalid: Invalid JSON: EOF while parsing",
        ),
        (
            "NOTIFLOW_TEMPLATES_DIR",
            "/nonexistent",
            "/nonexistent is not a directory",
        ),
        ("NOTIFLOW_TEMPLATES_DIR", "/" + "t" * 300, "File name too long"),
        ("NOTIFLOW_CHANNEL_CONFIG", "", "is empty; name a path"),
        ("NOTIFLOW_TEMPLATES_DIR", " ", "is empty; name a path"),
        (
            "NOTIFLOW_CHANNEL_CONFIG",
            "long template",
            "the name of a template set: up to 100 lower-case letters",
        ),
        ("NOTIFLOW_CHANNEL_CONFIG", "fifo", "cannot be read: not a regular file"),
    ],
)
def test_an_unusable_channel_configuration_or_templates_dir_exits_2_in_one_line(
    tmp_path: Path, setting: str, value: str, complaint: str
) -> None:
    if value == "misspelt":
        value = str(misspelt(tmp_path))
    elif value == "misnamed":
        misnamed = tmp_path / "channels.json"
        text = channels.DEFAULT_PATH.read_text()
        misnamed.write_text(text.replace('"comment.mention"', '"comment.mentions"'))
        value = str(misnamed)
    elif value == "truncated":
        truncated = tmp_path / "channels.json"
        truncated.write_text('{"channels": ')
        value = str(truncated)
    elif value == "long template":
        long = tmp_path / "channels.json"
        text = channels.DEFAULT_PATH.read_text()
        long.write_text(text.replace('"comment_reply"', f'"{"b" * 300}"'))
        value = str(long)
    elif value == "fifo":
        # Read as a file, it would wait for a writer for ever.
        os.mkfifo(tmp_path / "channels.json")
        value = str(tmp_path / "channels.json")

    done = start({setting: value})

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"notiflow: invalid setting {setting}: "), line
    assert complaint in line


def shipped_with(old: str, new: str, encoding: str = "utf-8") -> bytes:
    """The shipped configuration with one change made to its text."""
    text = channels.DEFAULT_PATH.read_text()
    assert old in text
    return text.replace(old, new, 1).encode(encoding)


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (
            shipped_with('["email", "sse"]', '["fax"]'),
            "is invalid: channel 'comment.reply' names unknown type 'fax' in "
            "'types'; the types are 'email', 'sse', 'push'",
        ),
        (
            shipped_with('"priority": 3,', '"priority": 3, "priority": 4,'),
            "is invalid: channel 'comment.reply' gives 'priority' more than once",
        ),
        (
            shipped_with('"comment.mention"', '"comment.reply"'),
            "is invalid: channel 'comment.reply' is given more than once",
        ),
        (
            shipped_with('"comment_reply"', '"comment_r\u00e9ply"', "latin-1"),
            "is not UTF-8 text: line 5 holds the byte 0xe9, which UTF-8 does not "
            "allow there; save it as UTF-8",
        ),
    ],
)
def test_a_mistake_in_the_channel_configuration_exits_2_saying_what_is_allowed(
    tmp_path: Path, data: bytes, complaint: str
) -> None:
    path = tmp_path / "channels.json"
    path.write_bytes(data)

    done = start({"NOTIFLOW_CHANNEL_CONFIG": str(path)})

    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"notiflow: invalid setting NOTIFLOW_CHANNEL_CONFIG: {path} {complaint}"
    )


def test_a_channel_configuration_saved_with_a_utf8_byte_order_mark_is_accepted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "channels.json"
    path.write_bytes(codecs.BOM_UTF8 + channels.DEFAULT_PATH.read_bytes())

    settings = DispatcherSettings(channel_config=path)

    loaded = settings.channels_at_start
    assert loaded is not None
    assert set(loaded.config.channels) == set(channels.KNOWN)


def test_the_dispatcher_starts_from_the_configuration_its_check_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "channels.json"
    path.write_text(channels.DEFAULT_PATH.read_text())
    reads: list[Path] = []
    read = channels.read

    def counted(where: Path, check: channels.TemplateCheck) -> channels.ChannelFile:
        reads.append(where)
        return read(where, check)

    monkeypatch.setattr(channels, "read", counted)
    settings = DispatcherSettings(channel_config=path)
    # An edit that lands between the check and the start is a reload's to judge:
    # a broken one is refused then, keeping what was checked, and stops nothing.
    path.write_text('{"channels": ')

    create_app(settings)

    assert reads == [path]


def test_a_template_naming_a_value_the_dispatcher_does_not_give_stops_the_start(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "templates"
    shutil.copytree(templates.DEFAULT_DIR, folder)
    (folder / "comment_mention" / "title.txt.j2").write_text("{{ nope }} said hi")

    done = start({"NOTIFLOW_TEMPLATES_DIR": str(folder)})

    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "channel 'comment.mention' names template 'comment_mention'" in line
    assert "comment_mention/title.txt.j2 failed: UndefinedError" in line
    assert "'nope' is undefined" in line
