from __future__ import annotations

import codecs
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from dispatcher import channels
from dispatcher.channels import (
    DEFAULT_PATH,
    ChannelConfigs,
    ConfigError,
    load,
    parse,
)
from dispatcher.service import Dispatcher
from dispatcher.templates import DEFAULT_DIR, Renderer, sample_context

# Every template set the shipped directory holds can be named.
SHIPPED = Renderer().problem


def write(path: Path, data: object, bump: int) -> None:
    write_bytes(path, json.dumps(data).encode(), bump)


def write_bytes(path: Path, data: bytes, bump: int) -> None:
    path.write_bytes(data)
    # Make the change visible even on filesystems with coarse timestamps.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))


def config(
    types: list[str], priority: int = 5, template: str = "comment_reply"
) -> dict[str, object]:
    return {
        "channels": {
            "comment.reply": {
                "types": types,
                "template": template,
                "priority": priority,
            }
        }
    }


def test_shipped_configuration_is_valid() -> None:
    shipped = ChannelConfigs(DEFAULT_PATH, SHIPPED).current()

    assert {"comment.reply", "comment.mention"} <= set(shipped.channels)


def test_changes_to_the_file_apply_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["email"]), bump=0)
    configs = ChannelConfigs(path, SHIPPED)
    assert configs.current().channels["comment.reply"].types == ("email",)

    write(path, config(["email", "sse"], priority=9), bump=1)

    reloaded = configs.current().channels["comment.reply"]
    assert reloaded.types == ("email", "sse")
    assert reloaded.priority == 9


def test_an_edit_after_a_configuration_was_loaded_is_judged_as_a_reload(
    tmp_path: Path,
) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["sse"]), bump=0)
    loaded = load(path, SHIPPED)
    write(path, config(["carrier-pigeon"]), bump=1)

    configs = ChannelConfigs(path, SHIPPED, loaded)
    kept = configs.current().channels["comment.reply"].types
    write(path, config(["email"]), bump=2)
    fixed = configs.current().channels["comment.reply"].types

    assert (kept, fixed) == (("sse",), ("email",))


def test_a_broken_edit_keeps_the_last_good_configuration(tmp_path: Path) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["sse"]), bump=0)
    configs = ChannelConfigs(path, SHIPPED)

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


def test_an_edit_naming_a_missing_template_keeps_the_last_good_configuration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["email"]), bump=0)
    configs = ChannelConfigs(path, SHIPPED)

    write(path, config(["email", "sse"], template="comment_replyy"), bump=1)
    with caplog.at_level(logging.WARNING, logger="dispatcher.channels"):
        kept = configs.current().channels["comment.reply"]
        again = configs.current().channels["comment.reply"]

    assert kept.template == again.template == "comment_reply"
    assert kept.types == ("email",)
    [refused] = caplog.records
    assert refused.levelno == logging.ERROR
    assert refused.action == "channels.reload_failed"  # type: ignore[attr-defined]
    assert "channel 'comment.reply'" in refused.getMessage()
    assert "template 'comment_replyy'" in refused.getMessage()
    assert "keeping the last configuration" in refused.getMessage()


def test_an_edit_refused_for_a_template_set_missing_then_is_taken_once_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["email"]), bump=0)
    present = {"comment_reply": True}
    configs = ChannelConfigs(
        path, lambda name: None if present.get(name) else "not found"
    )
    present["comment_reply"] = False  # the templates directory moved away

    write(path, config(["email", "sse"]), bump=1)
    with caplog.at_level(logging.INFO, logger="dispatcher.channels"):
        refused = configs.recheck()
        still = configs.recheck()
        present["comment_reply"] = True  # and back
        taken = configs.recheck()
        kept = configs.recheck()

    assert refused.channels["comment.reply"].types == ("email",)
    assert still.channels["comment.reply"].types == ("email",)
    assert taken.channels["comment.reply"].types == ("email", "sse")
    assert kept.channels["comment.reply"].types == ("email", "sse")
    assert [r.action for r in caplog.records] == [  # type: ignore[attr-defined]
        "channels.reload_failed",
        "channels.reloaded",
    ]


def test_an_edit_refused_for_what_it_holds_is_not_read_again_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["email"]), bump=0)
    configs = ChannelConfigs(path, SHIPPED)
    reads: list[Path] = []
    real_read = channels.read

    def counted(at: Path, templates: object) -> object:
        reads.append(at)
        return real_read(at, templates)  # type: ignore[arg-type]

    monkeypatch.setattr(channels, "read", counted)
    write(
        path,
        {
            "channels": {
                "comment.replyy": config(["email"])["channels"]["comment.reply"]
            }
        },
        bump=1,
    )

    for _ in range(3):
        assert configs.recheck().channels["comment.reply"].types == ("email",)

    assert reads == [path]


def test_an_error_names_ten_unknown_channels_and_counts_the_rest() -> None:
    many = {
        f"c{n}": {"types": ["email"], "template": "t", "priority": 1} for n in range(25)
    }

    with pytest.raises(ConfigError) as refused:
        parse(json.dumps({"channels": many}))

    message = str(refused.value)
    assert "'c0'" in message and "'c9'" in message and "'c10'" not in message
    assert message.endswith(
        "and 15 more; the known channels are 'comment.mention', 'comment.reply'"
    )


def test_a_file_renamed_over_the_configuration_is_read_though_its_times_match(
    tmp_path: Path,
) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["email"], priority=3), bump=0)
    configs = ChannelConfigs(path, SHIPPED)
    replacement = tmp_path / "next.json"
    # Same size, same times: only the inode tells it apart.
    write(replacement, config(["email"], priority=4), bump=0)
    st = path.stat()
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert replacement.stat().st_size == st.st_size

    replacement.rename(path)

    assert configs.current().channels["comment.reply"].priority == 4


def test_an_edit_naming_a_template_set_missing_a_file_is_refused(
    tmp_path: Path,
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(DEFAULT_DIR, templates)
    (templates / "comment_mention" / "email.html.j2").unlink()
    path = tmp_path / "channels.json"
    write(path, config(["sse"]), bump=0)
    configs = ChannelConfigs(path, Renderer(templates).problem)

    write(path, config(["email"], template="comment_mention"), bump=1)

    assert configs.current().channels["comment.reply"].template == "comment_reply"


def test_a_template_with_a_syntax_error_is_refused_naming_file_and_line(
    tmp_path: Path,
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(DEFAULT_DIR, templates)
    (templates / "comment_reply" / "message.txt.j2").write_text("ok\n{{ oops }")
    path = tmp_path / "channels.json"
    write(path, config(["sse"]), bump=0)

    with pytest.raises(ConfigError) as refused:
        ChannelConfigs(path, Renderer(templates).problem)

    assert "message.txt.j2, line 2" in str(refused.value)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (None, "cannot be read: No such file or directory"),
        ('{"channels": ', "is invalid: Invalid JSON"),
        (json.dumps(config(["sse"], template="nothing_here")), "'nothing_here'"),
    ],
)
def test_a_configuration_that_cannot_be_used_at_start_is_refused(
    tmp_path: Path, text: str | None, complaint: str
) -> None:
    path = tmp_path / "channels.json"
    if text is not None:
        path.write_text(text)

    with pytest.raises(ConfigError, match=complaint) as refused:
        ChannelConfigs(path, SHIPPED)

    assert str(path) in str(refused.value)


def test_an_edit_naming_an_unknown_channel_keeps_the_last_good_configuration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["email"]), bump=0)
    configs = ChannelConfigs(path, SHIPPED)
    misspelt = config(["email", "sse"])
    channel = {"types": ["sse"], "template": "comment_mention", "priority": 8}
    misspelt["channels"]["comment.mentions"] = channel  # type: ignore[index]

    write(path, misspelt, bump=1)
    with caplog.at_level(logging.INFO, logger="dispatcher.channels"):
        kept = configs.current()
        again = configs.current()

    assert kept == again
    assert set(kept.channels) == {"comment.reply"}
    assert kept.channels["comment.reply"].types == ("email",)
    [refused] = caplog.records
    assert refused.levelno == logging.ERROR
    assert refused.action == "channels.reload_failed"  # type: ignore[attr-defined]
    assert "unknown channel 'comment.mentions'" in refused.getMessage()
    assert "'comment.mention', 'comment.reply'" in refused.getMessage()


def test_a_configuration_naming_an_unknown_channel_is_refused_at_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "channels.json"
    data = json.loads(DEFAULT_PATH.read_text())
    data["channels"]["comment.mentions"] = data["channels"].pop("comment.mention")
    path.write_text(json.dumps(data))

    with pytest.raises(ConfigError) as refused:
        ChannelConfigs(path, SHIPPED)

    assert "unknown channel 'comment.mentions'" in str(refused.value)
    assert str(path) in str(refused.value)


def test_a_file_gone_at_runtime_is_reported_once_and_again_when_it_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["email"]), bump=0)
    configs = ChannelConfigs(path, SHIPPED)

    path.unlink()
    with caplog.at_level(logging.INFO, logger="dispatcher.channels"):
        kept = [configs.current() for _ in range(10)]
        gone = list(caplog.records)
        caplog.clear()
        write(path, config(["sse"]), bump=2)
        back = [configs.current() for _ in range(3)]
        returned = list(caplog.records)

    assert {c.channels["comment.reply"].types for c in kept} == {("email",)}
    [missing] = gone
    assert missing.levelno == logging.ERROR
    assert missing.action == "channels.reload_failed"  # type: ignore[attr-defined]
    assert "No such file or directory" in missing.getMessage()
    assert {c.channels["comment.reply"].types for c in back} == {("sse",)}
    [reloaded] = returned
    assert reloaded.action == "channels.reloaded"  # type: ignore[attr-defined]


# A good file as a Windows editor saves it: UTF-8 after a byte order mark.
BOM = codecs.BOM_UTF8 + json.dumps(config(["sse"])).encode()


def test_a_file_starting_with_a_utf8_byte_order_mark_is_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / "channels.json"
    path.write_bytes(BOM)

    started = ChannelConfigs(path, SHIPPED).current()

    assert started.channels["comment.reply"].types == ("sse",)


def test_an_edit_saved_with_a_utf8_byte_order_mark_applies(tmp_path: Path) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["email"]), bump=0)
    configs = ChannelConfigs(path, SHIPPED)

    write_bytes(path, BOM, bump=1)

    assert configs.current().channels["comment.reply"].types == ("sse",)


def reply(**fields: object) -> str:
    """A file whose reply channel has these fields, the others left valid."""
    channel = {"types": ["email"], "template": "comment_reply", "priority": 5}
    return json.dumps({"channels": {"comment.reply": {**channel, **fields}}})


CHANNEL = '{"types": ["sse"], "template": "comment_reply", "priority": 5}'

# A plausible mistake in the file, and all that the refusal says of it.
MISTAKES = [
    (
        codecs.BOM_UTF16_LE + reply().encode("utf-16-le"),
        "is not UTF-8 text: it starts with a UTF-16 byte order mark; save it as UTF-8",
    ),
    (
        reply().replace("comment_reply", "café").encode("latin-1"),
        "is not UTF-8 text: line 1 holds the byte 0xe9, which UTF-8 does not "
        "allow there; save it as UTF-8",
    ),
    (
        reply(types=["fax"]),
        "is invalid: channel 'comment.reply' names unknown type 'fax' in "
        "'types'; the types are 'email', 'sse', 'push'",
    ),
    (
        reply(types=["email", "sse", "email"]),
        "is invalid: channel 'comment.reply' names 'email' twice in 'types'",
    ),
    (
        reply(types=[]),
        "is invalid: channel 'comment.reply' has 'types' []; it must be a list "
        "of one or more of 'email', 'sse', 'push'",
    ),
    (
        reply(types="email"),
        "is invalid: channel 'comment.reply' has 'types' 'email'; it must be a "
        "list of one or more of 'email', 'sse', 'push'",
    ),
    (
        reply(priority=12),
        "is invalid: channel 'comment.reply' has 'priority' 12; it must be a "
        "whole number from 0 to 9",
    ),
    (
        reply(priority=None),
        "is invalid: channel 'comment.reply' has 'priority' null; it must be a "
        "whole number from 0 to 9",
    ),
    (
        reply(priority=True),
        "is invalid: channel 'comment.reply' has 'priority' true; it must be a "
        "whole number from 0 to 9",
    ),
    (
        reply(priority="3"),
        "is invalid: channel 'comment.reply' has 'priority' '3'; it must be a "
        "whole number from 0 to 9",
    ),
    (
        reply(template=5),
        "is invalid: channel 'comment.reply' has 'template' 5; it must be the "
        "name of a template set: up to 100 lower-case letters, digits and _",
    ),
    (
        reply(enabled="maybe"),
        "is invalid: channel 'comment.reply' has 'enabled' 'maybe'; it must be "
        "true or false",
    ),
    (
        reply(enabled="false"),
        "is invalid: channel 'comment.reply' has 'enabled' 'false'; it must be "
        "true or false",
    ),
    (
        reply(enabled=1),
        "is invalid: channel 'comment.reply' has 'enabled' 1; it must be true or false",
    ),
    (
        json.dumps({"channels": {"comment.reply": {"types": ["sse"]}}}),
        "is invalid: channel 'comment.reply' lacks 'template', the name of a "
        "template set: up to 100 lower-case letters, digits and _; channel "
        "'comment.reply' lacks 'priority', a whole number from 0 to 9",
    ),
    (
        reply(colour="red"),
        "is invalid: channel 'comment.reply' has unknown field 'colour'; "
        "the fields are 'types', 'template', 'priority', 'enabled'",
    ),
    (
        json.dumps({"channels": {"comment.reply": ["email"]}}),
        "is invalid: channel 'comment.reply' must be an object of 'types', "
        "'template', 'priority', 'enabled', not [\"email\"]",
    ),
    (
        json.dumps({"channels": []}),
        "is invalid: 'channels' must be an object of channel names, not []",
    ),
    (
        json.dumps({"comment.reply": json.loads(CHANNEL)}),
        "is invalid: 'channels' is missing; the file must hold "
        '{"channels": {<channel name>: {"types": [...], ...}}}; unknown key '
        "'comment.reply' at the top level, which holds only 'channels'",
    ),
    (
        "[]",
        'is invalid: the file must hold {"channels": {<channel name>: '
        '{"types": [...], ...}}}, not []',
    ),
    (
        "",
        'is empty; it must hold {"channels": {<channel name>: {"types": [...], ...}}}',
    ),
    (
        f'{{"channels": {{"comment.reply": {CHANNEL}, "comment.reply": {CHANNEL}}}}}',
        "is invalid: channel 'comment.reply' is given more than once",
    ),
    (
        '{"channels": {"comment.reply": {"types": ["sse"], "priority": 5, '
        '"template": "comment_reply", "priority": 9}}}',
        "is invalid: channel 'comment.reply' gives 'priority' more than once",
    ),
    (
        f'{{"channels": {{}}, "channels": {{"comment.reply": {CHANNEL}}}}}',
        "is invalid: 'channels' is given more than once",
    ),
]


@pytest.mark.parametrize(("text", "complaint"), MISTAKES)
def test_a_mistake_at_start_is_refused_in_one_line_saying_what_is_allowed(
    tmp_path: Path, text: str | bytes, complaint: str
) -> None:
    path = tmp_path / "channels.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())

    with pytest.raises(ConfigError) as refused:
        ChannelConfigs(path, SHIPPED)

    assert str(refused.value) == f"{path} {complaint}"


@pytest.mark.parametrize(("text", "complaint"), MISTAKES)
def test_a_mistaken_edit_keeps_the_last_configuration_saying_what_is_allowed(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    text: str | bytes,
    complaint: str,
) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["email"]), bump=0)
    configs = ChannelConfigs(path, SHIPPED)

    write_bytes(path, text if isinstance(text, bytes) else text.encode(), bump=1)
    with caplog.at_level(logging.INFO, logger="dispatcher.channels"):
        kept = configs.current()
        again = configs.current()

    assert kept == again
    assert kept.channels["comment.reply"].types == ("email",)
    [refused] = caplog.records
    assert refused.levelno == logging.ERROR
    assert refused.action == "channels.reload_failed"  # type: ignore[attr-defined]
    assert refused.getMessage() == (
        f"{path} {complaint}; keeping the last configuration"
    )


def test_a_file_turning_every_channel_off_is_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "channels.json"
    off = config(["email"])
    off["channels"]["comment.reply"]["enabled"] = False  # type: ignore[index]
    write(path, off, bump=0)

    with caplog.at_level(logging.WARNING, logger="dispatcher.channels"):
        ChannelConfigs(path, SHIPPED)

    [warned] = caplog.records
    assert warned.action == "channels.none"  # type: ignore[attr-defined]
    assert warned.getMessage() == (
        f"{path} turns every channel off, so no event notifies anyone"
    )


def test_a_file_configuring_no_channel_is_used_with_one_warning_per_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "channels.json"
    write(path, {"channels": {}}, bump=0)
    with caplog.at_level(logging.INFO, logger="dispatcher.channels"):
        configs = ChannelConfigs(path, SHIPPED)
        started = [configs.current() for _ in range(3)]
        at_start = list(caplog.records)
        caplog.clear()
        write(path, config(["email"]), bump=1)
        configs.current()
        write(path, {"channels": {}}, bump=2)
        reloaded = [configs.current() for _ in range(3)]
        on_reload = [r for r in caplog.records if r.levelno == logging.WARNING]

    assert {len(c.channels) for c in started + reloaded} == {0}
    for records in (at_start, on_reload):
        [warned] = records
        assert warned.levelno == logging.WARNING
        assert warned.action == "channels.none"  # type: ignore[attr-defined]
        assert warned.getMessage() == (
            f"{path} configures no channel, so no event notifies anyone"
        )


def test_an_edit_of_the_same_size_that_keeps_the_modification_time_applies(
    tmp_path: Path,
) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["email"], priority=3), bump=0)
    configs = ChannelConfigs(path, SHIPPED)
    assert configs.current().channels["comment.reply"].priority == 3
    kept = path.stat()

    path.write_text(json.dumps(config(["email"], priority=4)))
    os.utime(path, ns=(kept.st_atime_ns, kept.st_mtime_ns))

    assert path.stat().st_size == kept.st_size
    assert configs.current().channels["comment.reply"].priority == 4


def _mount_version(mount: Path, version: str, title: str) -> None:
    """A ConfigMap's files under ``mount``: ``..data`` links to a directory of
    the version's files, replaced at once when the ConfigMap changes."""
    folder = mount / version
    shutil.copytree(DEFAULT_DIR, folder / "templates")
    shutil.copy(DEFAULT_PATH, folder / "channels.json")
    (folder / "templates" / "comment_reply" / "title.txt.j2").write_text(title)
    (mount / "..next").symlink_to(version)
    os.replace(mount / "..next", mount / "..data")


def test_a_mount_swapped_to_a_broken_template_logs_one_error_and_keeps_going(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mount = tmp_path / "config"
    mount.mkdir()
    _mount_version(mount, "v1", "First {{ post.title }}")
    (mount / "channels.json").symlink_to("..data/channels.json")
    (mount / "templates").symlink_to("..data/templates")
    renderer = Renderer(mount / "templates")
    dispatcher = Dispatcher(
        ChannelConfigs(mount / "channels.json", renderer.problem),
        renderer,
        "http://127.0.0.1:8081",
        secret_key="k" * 32,
    )

    # The same channel file, beside a template that no longer parses.
    _mount_version(mount, "v2", "{{ post.title ")
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            dispatcher.refresh()
        rendered = renderer.render("comment_reply", _reply_context())

    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in errors] == ["dispatcher.templates"]
    assert "comment_reply/title.txt.j2" in errors[0].getMessage()
    assert rendered.title == "First Launch"

    # Fixed in the next version: taken up, with nothing more to complain of.
    _mount_version(mount, "v3", "Third {{ post.title }}")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        dispatcher.refresh()
    assert renderer.render("comment_reply", _reply_context()).title == "Third Launch"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _reply_context() -> dict[str, object]:
    return {
        **sample_context(("post_author",)),
        "post": {"id": 1, "title": "Launch"},
    }


def test_a_fifo_put_in_place_of_the_file_is_refused_without_waiting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["email"]), bump=0)
    configs = ChannelConfigs(path, SHIPPED)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fifo.replace(path)
    found: list[channels.ChannelFile] = []

    # A read that waits for a writer would hold this thread for ever.
    with caplog.at_level(logging.ERROR, logger="dispatcher.channels"):
        reader = threading.Thread(target=lambda: found.append(configs.current()))
        reader.start()
        reader.join(timeout=10)

    assert not reader.is_alive(), "the reader waits on the FIFO"
    assert found[0].channels["comment.reply"].types == ("email",)
    assert "cannot be read: not a regular file" in caplog.text


def test_a_template_name_too_long_for_a_folder_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="up to 100 lower-case letters"):
        parse(json.dumps(config(["email"], template="b" * 300)))


def test_a_template_set_whose_name_the_file_system_refuses_is_a_problem(
    tmp_path: Path,
) -> None:
    problem = Renderer(tmp_path).problem("b" * 300)

    assert problem is not None
    assert "File name too long" in problem


def test_a_refused_edit_shows_on_the_metrics_until_a_good_one_is_taken_up(
    tmp_path: Path,
) -> None:
    path = tmp_path / "channels.json"
    write(path, config(["email"]), bump=0)
    configs = ChannelConfigs(path, SHIPPED)

    def refused() -> float | None:
        return REGISTRY.get_sample_value("notiflow_dispatcher_config_refused")

    write(path, config(["email"], priority=12), bump=1)
    configs.current()
    while_refused = refused()
    write(path, config(["sse"]), bump=2)
    configs.current()

    assert while_refused == 1
    assert refused() == 0
