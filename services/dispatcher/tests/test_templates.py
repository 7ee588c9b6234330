from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from jinja2 import Template
from prometheus_client import REGISTRY

from dispatcher import templates
from dispatcher.templates import Renderer, RenderError

UNSUBSCRIBE = "http://example.test/unsubscribe?token=2.email.abc"


def context(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "recipient": {"id": 2, "username": "bob", "display_name": "Bob"},
        "commenter": {"id": 3, "username": "carol", "display_name": "Zoë 🚀"},
        "post": {"id": 1, "title": "Launch <plans>"},
        "comment": {"id": 9, "body": "<b>hi</b> @bob", "excerpt": "<b>hi</b> @bob"},
        "reasons": ["mentioned"],
        "url": "http://example.test/?post=1#comment-9",
        "unsubscribe_url": UNSUBSCRIBE,
    }
    base.update(overrides)
    return base


def test_mention_renders_title_text_and_escaped_html() -> None:
    rendered = Renderer().render("comment_mention", context())

    assert rendered.title == "Zoë 🚀 mentioned you on “Launch <plans>”"
    assert "<b>hi</b> @bob" in rendered.message
    assert "&lt;b&gt;hi&lt;/b&gt; @bob" in rendered.html
    assert "Launch &lt;plans&gt;" in rendered.html
    assert 'href="http://example.test/?post=1#comment-9"' in rendered.html


@pytest.mark.parametrize("template", ["comment_mention", "comment_reply"])
def test_an_email_keeps_the_comments_lines_and_greets_its_reader(template: str) -> None:
    body = "first line\n<b>second</b>\n\nafter a blank"
    rendered = Renderer().render(
        template, context(comment={"id": 9, "body": body, "excerpt": body})
    )

    assert (
        "first line<br>&lt;b&gt;second&lt;/b&gt;<br><br>after a blank" in rendered.html
    )
    assert rendered.email_text.startswith("Hello Bob,\n\n")
    assert body in rendered.email_text


def test_reply_wording_depends_on_the_reason() -> None:
    renderer = Renderer()

    own = renderer.render("comment_reply", context(reasons=["post_author"]))
    other = renderer.render("comment_reply", context(reasons=["participant"]))

    assert "your post" in own.email_text and "your post" in own.html
    assert "a post you follow" in other.email_text
    assert "a post you follow" in other.html


@pytest.mark.parametrize("template", ["comment_mention", "comment_reply"])
def test_the_in_app_message_is_the_comment_and_the_title_says_who_wrote_where(
    template: str,
) -> None:
    rendered = Renderer().render(template, context())

    # The page and push show the title above the message: the message adds the
    # comment itself, not the title's words again.
    assert rendered.message.strip() == "<b>hi</b> @bob"
    assert rendered.title.startswith("Zoë 🚀 ")
    assert "Launch <plans>" in rendered.title


def template_set(directory: Path, title: str = "x") -> Path:
    folder = directory / "broken"
    folder.mkdir()
    (folder / "title.txt.j2").write_text(title)
    (folder / "message.txt.j2").write_text("x")
    (folder / "email.html.j2").write_text("x")
    return folder


def test_a_template_naming_an_unknown_variable_fails(tmp_path: Path) -> None:
    template_set(tmp_path, title="{{ nobody.name }}")

    with pytest.raises(RenderError, match=r"broken/title.txt.j2 .*'nobody'"):
        Renderer(tmp_path).render("broken", context())


def test_a_template_that_raises_fails_naming_the_file(tmp_path: Path) -> None:
    template_set(tmp_path, title="{{ 1 // 0 }}")

    with pytest.raises(RenderError, match=r"broken/title.txt.j2 .*ZeroDivisionError"):
        Renderer(tmp_path).render("broken", context())


def test_a_template_file_gone_before_it_ever_rendered_is_no_os_error(
    tmp_path: Path,
) -> None:
    # An OSError reaching the consumer would hold the event as if the database
    # were away; a missing template is a bug to fix, not an outage to wait out.
    folder = template_set(tmp_path)
    assert Renderer(tmp_path).problem("broken") is None
    (folder / "message.txt.j2").unlink()

    with pytest.raises(RenderError) as failed:
        Renderer(tmp_path).render("broken", context())

    assert "broken/message.txt.j2 not found" in str(failed.value)
    assert not isinstance(failed.value, OSError)
    assert "message.txt.j2 is missing" in (Renderer(tmp_path).problem("broken") or "")


def test_a_template_set_that_is_not_there_is_a_problem(tmp_path: Path) -> None:
    assert Renderer(tmp_path).problem("comment_mentionn") == f"not found in {tmp_path}"
    assert Renderer().problem("comment_mention") is None


def test_long_titles_are_shortened() -> None:
    rendered = Renderer().render(
        "comment_reply", context(post={"id": 1, "title": "x" * 500})
    )

    assert len(rendered.title) == 200
    assert rendered.title.endswith("…")


@pytest.mark.parametrize("template", ["comment_mention", "comment_reply"])
def test_an_email_ends_with_the_link_that_turns_emails_off(template: str) -> None:
    rendered = Renderer().render(template, context())

    assert rendered.message in rendered.email_text
    last_line = rendered.email_text.splitlines()[-1]
    assert last_line == f"Turn off these emails: {UNSUBSCRIBE}"
    assert rendered.html.endswith(
        f'<a href="{UNSUBSCRIBE}">Turn off these emails</a></p>'
    )


@pytest.mark.parametrize("template", ["comment_mention", "comment_reply"])
def test_the_in_app_message_has_no_email_link(template: str) -> None:
    rendered = Renderer().render(template, context())

    assert UNSUBSCRIBE not in rendered.message
    assert "Turn off" not in rendered.message


def test_a_set_that_does_not_use_the_link_still_renders(tmp_path: Path) -> None:
    folder = template_set(tmp_path)
    (folder / "message.txt.j2").write_text("Hi {{ recipient.display_name }}")
    renderer = Renderer(tmp_path)

    rendered = renderer.render("broken", context())

    assert renderer.problem("broken") is None
    assert rendered.message == rendered.email_text == "Hi Bob"


def test_a_broken_email_text_template_is_a_problem(tmp_path: Path) -> None:
    folder = template_set(tmp_path)
    (folder / "email.txt.j2").write_text("{{ message ")

    problem = Renderer(tmp_path).problem("broken")

    # Where the file is, for the channel configuration's error names only it.
    assert problem is not None
    assert problem.startswith(f"{tmp_path}/broken/email.txt.j2, line 1:")


def _edit(path: Path, text: str) -> None:
    """Write ``text`` with a later modification time, as a save some time on would."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


@pytest.mark.parametrize(
    ("name", "broken", "fault"),
    [
        ("title.txt.j2", "{{ broken ", "title.txt.j2 failed: line 1: unexpected"),
        (
            "message.txt.j2",
            "x {{ no_such_variable }}",
            "'no_such_variable' is undefined",
        ),
        (
            "email.txt.j2",
            "{% if %}",
            "email.txt.j2 failed: line 1: Expected an expression",
        ),
    ],
)
def test_a_broken_edit_keeps_the_files_last_version_that_rendered(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    name: str,
    broken: str,
    fault: str,
) -> None:
    folder = template_set(tmp_path, title="Hello {{ recipient.username }}")
    _edit(folder / "email.txt.j2", "{{ message }} by mail")
    renderer = Renderer(tmp_path)
    first = renderer.render("broken", context())

    _edit(folder / name, broken)
    with caplog.at_level(logging.ERROR, logger="dispatcher.templates"):
        again = renderer.render("broken", context())
        later = renderer.render("broken", context(recipient={"username": "carol"}))

    assert again == first
    assert later.title == "Hello carol"
    # Once for the fault, however many notifications it touches.
    (record,) = caplog.records
    assert fault in record.getMessage()
    assert record.getMessage().endswith(
        "last version that rendered is used until it is fixed"
    )


def test_a_fixed_template_is_used_again(tmp_path: Path) -> None:
    folder = template_set(tmp_path, title="one")
    renderer = Renderer(tmp_path)
    assert renderer.render("broken", context()).title == "one"

    _edit(folder / "title.txt.j2", "{{ oops")
    assert renderer.render("broken", context()).title == "one"
    _edit(folder / "title.txt.j2", "two")

    assert renderer.render("broken", context()).title == "two"


def test_a_required_file_removed_after_rendering_keeps_its_last_version(
    tmp_path: Path,
) -> None:
    folder = template_set(tmp_path, title="kept")
    renderer = Renderer(tmp_path)
    renderer.render("broken", context())

    (folder / "title.txt.j2").unlink()

    assert renderer.render("broken", context()).title == "kept"


def test_a_removed_email_text_file_keeps_its_last_version(tmp_path: Path) -> None:
    # Optional in a set that never had one; a set that had one and lost it
    # would send emails without the link that ends them.
    folder = template_set(tmp_path)
    _edit(folder / "email.txt.j2", "{{ message }} -- {{ unsubscribe_url }}")
    renderer = Renderer(tmp_path)
    assert renderer.render("broken", context()).email_text == f"x -- {UNSUBSCRIBE}"

    (folder / "email.txt.j2").unlink()

    assert renderer.render("broken", context()).email_text == f"x -- {UNSUBSCRIBE}"


@pytest.mark.parametrize("broken", ["{{ message ", "{{ no_such_variable }}", " "])
def test_a_broken_email_text_added_to_a_set_without_one_keeps_emails_going(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str
) -> None:
    folder = template_set(tmp_path)
    renderer = Renderer(tmp_path)
    assert renderer.problem("broken") is None

    _edit(folder / "email.txt.j2", broken)
    with caplog.at_level(logging.ERROR, logger="dispatcher.templates"):
        renderer.look("broken")
        renderer.look("broken")
        first = renderer.render("broken", context())
        second = renderer.render("broken", context())

    assert first.email_text == second.email_text == "x"
    # Once, said by the look that found it, with what emails carry meanwhile.
    (record,) = caplog.records
    assert "broken/email.txt.j2" in record.getMessage()
    assert "emails take the message as their text" in record.getMessage()

    _edit(folder / "email.txt.j2", "{{ message }} by mail")
    assert renderer.render("broken", context()).email_text == "x by mail"


@pytest.mark.parametrize("emptied", ["title.txt.j2", "message.txt.j2", "email.html.j2"])
def test_a_file_emptied_while_running_keeps_its_last_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, emptied: str
) -> None:
    folder = template_set(tmp_path, title="Hello")
    renderer = Renderer(tmp_path)
    first = renderer.render("broken", context())

    _edit(folder / emptied, "  \n")
    with caplog.at_level(logging.ERROR, logger="dispatcher.templates"):
        again = renderer.render("broken", context())

    assert again == first
    (record,) = caplog.records
    assert f"broken/{emptied} renders nothing but blanks" in record.getMessage()


def test_a_set_that_renders_nothing_never_sends_an_empty_notification(
    tmp_path: Path,
) -> None:
    template_set(tmp_path, title="{% if 'mentioned' in reasons %}x{% endif %}")

    with pytest.raises(RenderError, match=r"title\.txt\.j2 renders nothing"):
        Renderer(tmp_path).render("broken", context(reasons=["participant"]))


@pytest.mark.parametrize(
    ("title", "complaint"),
    [
        (
            "{{ nope }}",
            "for a recipient post_author: template broken/title.txt.j2 "
            "failed: UndefinedError(\"'nope' is undefined\")",
        ),
        (
            "{% if 'mentioned' in reasons %}{{ nope }}{% endif %}x",
            "for a recipient mentioned: ",
        ),
        (
            "{% if 'participant' in reasons %}x{% endif %}",
            "for a recipient post_author: template broken/title.txt.j2 renders nothing",
        ),
    ],
)
def test_the_check_renders_a_set_for_each_reason_to_be_notified(
    tmp_path: Path, title: str, complaint: str
) -> None:
    template_set(tmp_path, title=title)

    assert complaint in (Renderer(tmp_path).problem("broken") or "")


@pytest.mark.parametrize("first", ["post_author", "participant"])
def test_an_edit_that_fails_for_one_reason_keeps_the_last_version_for_all(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, first: str
) -> None:
    folder = template_set(tmp_path)
    _edit(folder / "message.txt.j2", "Before {{ comment.body }}")
    renderer = Renderer(tmp_path)
    assert renderer.problem("broken") is None

    _edit(
        folder / "message.txt.j2",
        "{% if 'participant' in reasons %}{{ nosuch }}{% endif %}"
        "EDITED {{ comment.body }}",
    )
    with caplog.at_level(logging.ERROR, logger="dispatcher.templates"):
        rendered = {
            reason: renderer.render("broken", context(reasons=[reason])).message
            for reason in (first, "mentioned", "post_author", "participant")
        }

    assert set(rendered.values()) == {"Before <b>hi</b> @bob"}
    (record,) = caplog.records
    assert "for a recipient participant" in record.getMessage()
    assert "'nosuch' is undefined" in record.getMessage()
    assert "nosuch" in (renderer.problem("broken") or "")

    _edit(folder / "message.txt.j2", "Fixed {{ comment.body }}")
    assert renderer.render("broken", context(reasons=["participant"])).message == (
        "Fixed <b>hi</b> @bob"
    )


@pytest.mark.parametrize(
    ("edit", "fault"),
    [
        pytest.param(
            "{{ recipient.display_name.encode('ascii') }}",
            "UnicodeEncodeError",
            id="fails on a name",
        ),
        pytest.param(
            "{% if reasons|length > 1 %}{{ nosuch }}{% endif %}x",
            "for a recipient post_author and participant",
            id="fails for two reasons at once",
        ),
    ],
)
def test_an_edit_the_trial_finds_wrong_keeps_the_last_version_for_everyone(
    tmp_path: Path, edit: str, fault: str
) -> None:
    folder = template_set(tmp_path, title="Before")
    renderer = Renderer(tmp_path)
    assert renderer.problem("broken") is None

    _edit(folder / "title.txt.j2", edit)
    titles = {
        renderer.render("broken", context(recipient=recipient, reasons=reasons)).title
        for recipient in ({"display_name": "Bob"}, {"display_name": "Zoë 🚀"})
        for reasons in (["participant"], ["post_author", "participant"])
    }

    assert titles == {"Before"}
    assert fault in (renderer.problem("broken") or "")


def test_a_version_that_fails_on_values_its_trial_lacked_falls_back_to_the_one_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = template_set(tmp_path, title="Before")
    renderer = Renderer(tmp_path)
    assert renderer.render("broken", context()).title == "Before"

    _edit(
        folder / "title.txt.j2", "{% if comment.id == 42 %}{{ nosuch }}{% endif %}New"
    )
    with caplog.at_level(logging.ERROR, logger="dispatcher.templates"):
        fine = renderer.render("broken", context()).title
        failing = [
            renderer.render("broken", context(comment={"id": 42})).title
            for _ in range(3)
        ]

    assert fine == "New"
    assert failing == ["Before"] * 3
    (record,) = caplog.records
    assert "'nosuch' is undefined" in record.getMessage()


def test_a_set_that_passed_the_check_has_a_version_to_keep(tmp_path: Path) -> None:
    folder = template_set(tmp_path, title="Checked")
    renderer = Renderer(tmp_path)
    assert renderer.problem("broken") is None

    _edit(folder / "title.txt.j2", "{{ broken ")

    assert renderer.render("broken", context()).title == "Checked"


def _rewrite(path: Path, text: str) -> None:
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_looking_takes_up_a_new_version_and_reports_a_broken_one_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = template_set(tmp_path, title="first {{ post.title }}")
    renderer = Renderer(tmp_path)
    assert renderer.problem("broken") is None
    title = folder / "title.txt.j2"

    _rewrite(title, "second {{ post.title }}")
    renderer.look("broken")
    _rewrite(title, "{{ post.title ")
    with caplog.at_level(logging.INFO, logger="dispatcher.templates"):
        renderer.look("broken")
        renderer.look("broken")
        rendered = renderer.render("broken", context())

    # The version no notification rendered is the one fallen back on.
    assert rendered.title == "second Launch <plans>"
    [broken] = caplog.records
    assert broken.levelno == logging.ERROR
    assert "broken/title.txt.j2" in broken.getMessage()


def test_a_version_failing_on_real_values_is_not_declared_fixed_by_looking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = template_set(tmp_path, title="first")
    renderer = Renderer(tmp_path)
    assert renderer.problem("broken") is None
    renderer.render("broken", context())
    # Passes its trial's made-up values; divides by zero on this comment.
    _rewrite(
        folder / "title.txt.j2",
        "{% if 'boom' in comment.body %}{{ 1 // 0 }}{% endif %}second",
    )
    boom = context(comment={"id": 9, "body": "boom", "excerpt": "boom"})

    with caplog.at_level(logging.INFO, logger="dispatcher.templates"):
        titles = []
        for _ in range(3):
            titles.append(renderer.render("broken", boom).title)
            renderer.look("broken")

    assert titles == ["first", "first", "first"]
    [failed] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert failed.levelno == logging.ERROR
    assert "ZeroDivisionError" in failed.getMessage()
    assert "renders again" not in caplog.text
    assert renderer.render("broken", context()).title == "second"


def test_an_edit_that_keeps_the_files_modification_time_is_taken_up(
    tmp_path: Path,
) -> None:
    # Images built reproducibly, and copies that keep times, give every version
    # of a file the same modification time.
    folder = template_set(tmp_path, title="first {{ post.id }}")
    renderer = Renderer(tmp_path)
    assert renderer.render("broken", context()).title == "first 1"
    path = folder / "title.txt.j2"
    kept = path.stat().st_mtime_ns

    path.write_text("second {{ post.id }}")
    os.utime(path, ns=(kept, kept))

    assert renderer.render("broken", context()).title == "second 1"


def test_a_link_swapped_to_another_directory_of_equal_times_is_taken_up(
    tmp_path: Path,
) -> None:
    # How a mounted ConfigMap changes: the link to its files moves, at once, to a
    # directory of new ones, whose times may equal the old ones'.
    for version in ("v1", "v2"):
        (tmp_path / version).mkdir()
        folder = template_set(tmp_path / version, title=f"{version} {{{{ post.id }}}}")
        for path in folder.iterdir():
            os.utime(path, ns=(10**9, 10**9))
    (tmp_path / "current").symlink_to("v1")
    renderer = Renderer(tmp_path / "current")
    assert renderer.render("broken", context()).title == "v1 1"

    (tmp_path / "next").symlink_to("v2")
    os.replace(tmp_path / "next", tmp_path / "current")
    renderer.look("broken")

    assert renderer.render("broken", context()).title == "v2 1"


def test_a_fix_taken_up_by_looking_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = template_set(tmp_path, title="first")
    renderer = Renderer(tmp_path)
    assert renderer.problem("broken") is None
    title = folder / "title.txt.j2"

    _rewrite(title, "{{ 1 / 0 }}")
    renderer.look("broken")
    _rewrite(title, "fixed {{ post.id }}")
    with caplog.at_level(logging.INFO, logger="dispatcher.templates"):
        renderer.look("broken")
        renderer.look("broken")
        rendered = renderer.render("broken", context())

    [broken, fixed] = caplog.records
    assert broken.levelno == logging.ERROR
    assert fixed.levelno == logging.INFO
    assert fixed.action == "template.fixed"  # type: ignore[attr-defined]
    assert fixed.getMessage() == "template broken/title.txt.j2 renders again"
    assert rendered.title.startswith("fixed ")


def test_a_file_written_in_place_is_not_used_half_written(tmp_path: Path) -> None:
    folder = template_set(tmp_path, title="first")
    renderer = Renderer(tmp_path, settle_seconds=0.3)
    assert renderer.render("broken", context()).title == "first"
    title = folder / "title.txt.j2"

    # Written in two steps, as an editor or a slow copy does.
    _rewrite(title, "Zoë m")
    renderer.look("broken")
    halfway = renderer.render("broken", context()).title
    _rewrite(title, "{{ commenter.display_name }} mentioned you")
    renderer.look("broken")
    written = renderer.render("broken", context()).title
    time.sleep(0.35)
    renderer.look("broken")
    settled = renderer.render("broken", context()).title

    assert (halfway, written) == ("first", "first")
    assert settled == "Zoë 🚀 mentioned you"


def test_a_file_that_does_not_parse_stays_broken_while_it_is_not_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = template_set(tmp_path, title="first")
    renderer = Renderer(tmp_path, settle_seconds=0.1)
    renderer.render("broken", context())

    def broken() -> float | None:
        return REGISTRY.get_sample_value("notiflow_dispatcher_templates_broken")

    _rewrite(folder / "title.txt.j2", "{% if %}")
    seen = []
    with caplog.at_level(logging.INFO, logger="dispatcher.templates"):
        # Looked at as the dispatcher does, for longer than the settle time, with
        # notifications rendered meanwhile.
        for _ in range(12):
            time.sleep(0.05)
            renderer.look("broken")
            title = renderer.render("broken", context()).title
            seen.append((broken(), title))
        # Then fixed: taken up once seen unchanged for the settle time.
        _rewrite(folder / "title.txt.j2", "fixed")
        renderer.look("broken")
        time.sleep(0.15)
        renderer.look("broken")

    after_settling = seen[4:]
    assert after_settling == [(1, "first")] * len(after_settling)
    actions = [r.action for r in caplog.records]  # type: ignore[attr-defined]
    assert actions == ["template.broken", "template.fixed"]
    assert broken() == 0


def test_a_file_saved_with_a_byte_order_mark_renders_without_it(
    tmp_path: Path,
) -> None:
    # Twice, as an editor that adds one to a file that had one leaves it.
    template_set(tmp_path, title="\ufeff\ufeffHello {{ recipient.display_name }}")

    rendered = Renderer(tmp_path).render("broken", context())

    assert rendered.title == "Hello Bob"


def test_a_broken_file_shows_on_the_metrics_until_it_renders_again(
    tmp_path: Path,
) -> None:
    folder = template_set(tmp_path, title="first")
    renderer = Renderer(tmp_path)
    renderer.render("broken", context())

    def broken() -> float | None:
        return REGISTRY.get_sample_value("notiflow_dispatcher_templates_broken")

    _rewrite(folder / "title.txt.j2", "{{ nobody.name }}")
    renderer.look("broken")
    while_broken = broken()
    _rewrite(folder / "title.txt.j2", "fixed")
    renderer.look("broken")

    assert while_broken == 1
    assert broken() == 0


def test_a_set_moved_away_and_back_as_it_was_is_fixed_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = template_set(tmp_path, title="first")
    renderer = Renderer(tmp_path)
    renderer.render("broken", context())
    away = tmp_path / "away"

    def broken() -> float | None:
        return REGISTRY.get_sample_value("notiflow_dispatcher_templates_broken")

    with caplog.at_level(logging.INFO, logger="dispatcher.templates"):
        # The set's folder moved: its files keep their stamps, as when a link
        # to a release is pointed elsewhere and back.
        folder.rename(away)
        renderer.look("broken")
        while_away = broken()
        away.rename(folder)
        renderer.look("broken")

    # The set's three files, gone and back.
    assert while_away == 3
    assert broken() == 0
    assert "template broken/title.txt.j2 renders again" in caplog.text


def test_a_broken_set_no_channel_names_any_more_is_not_counted(
    tmp_path: Path,
) -> None:
    folder = template_set(tmp_path, title="first")
    renderer = Renderer(tmp_path)
    renderer.render("broken", context())
    _rewrite(folder / "title.txt.j2", "{{ nobody.name }}")
    renderer.look("broken")
    counted = REGISTRY.get_sample_value("notiflow_dispatcher_templates_broken")

    renderer.forget_all_but(["comment_reply"])

    assert counted == 1
    assert REGISTRY.get_sample_value("notiflow_dispatcher_templates_broken") == 0


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}"
            "{% endfor %}{% endfor %}x",
            "took more than 0.1s of CPU",
        ),
        ("{{ comment.body | center(10**9) }}", "the center filter was asked for"),
        # A constant, which Jinja2 works out while compiling the file.
        ('{{ "a" | center(1500000000) }}', "the center filter was asked for"),
        ('{{ "x" | indent(1000000000, true) }}', "the indent filter was asked for"),
        ("{{ [1, 2] | slice(10**9) | list | length }}", "the slice filter was asked"),
        ("{{ [1] | batch(10**9, 0) | list }}", "the batch filter was asked for"),
        ("{{ comment.body.ljust(10**9) }}", "str.ljust was asked for"),
        ('{{ "%01000000000d" | format(1) }}', "a format asks for a width"),
        ('{{ "%*d" % (10**9, 1) }}', "a format asks for a width"),
        ('{{ "{:>1000000000}".format(1) }}', "a format asks for a width"),
        ('{{ "{:>{w}}".format(1, w=10**9) }}', "a format asks for a width"),
        ("{% for i in range(60000) %}ab{% endfor %}", "writes more than the 100,000"),
        ("{{ 'x' * 10**9 }}", "a * would make 1,000,000,000 items"),
        ("{{ comment.body * 10**9 }}", "a * would make"),
        ("{{ 7 ** (10**8) }}", "7 ** 100000000 would have more digits"),
        ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__'"),
        # The files of a notification share their values: none may change them.
        ("{% set m = recipient.pop('display_name') %}x", "is unsafe"),
        ("{{ reasons.append('x') }}x", "is unsafe"),
    ],
)
def test_a_template_past_the_limits_of_a_render_is_refused_without_hanging(
    tmp_path: Path, text: str, fault: str
) -> None:
    template_set(tmp_path, title=text)

    problem = Renderer(tmp_path).problem("broken")

    assert problem is not None
    assert "broken/title.txt.j2 failed: " in problem
    assert fault in problem


def test_an_edit_that_runs_too_long_is_tried_once_and_the_last_good_version_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = template_set(tmp_path, title="Before {{ recipient.username }}")
    renderer = Renderer(tmp_path)
    assert renderer.render("broken", context()).title == "Before bob"
    # Fast for the trial's made-up comment, endless for a real one.
    _edit(
        folder / "title.txt.j2",
        "{% if comment.id != 9 %}{% for i in range(100000) %}"
        "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}New",
    )
    renders: list[str] = []
    bounded = templates._bounded_render

    def counted(version: Template, values: dict[str, Any]) -> str:
        renders.append(version.filename or "")
        return bounded(version, values)

    monkeypatch.setattr(templates, "_bounded_render", counted)
    with caplog.at_level(logging.ERROR, logger="dispatcher.templates"):
        titles = [
            renderer.render("broken", context(comment={"id": 9 + n})).title
            for n in range(1, 4)
        ]

    assert titles == ["Before bob"] * 3
    (record,) = caplog.records
    assert "broken/title.txt.j2 failed: took more than 0.1s of CPU" in (
        record.getMessage()
    )
    # The slow version ran on one real comment only; the others went straight
    # to the version before it.
    title_renders = [f for f in renders if f.endswith("title.txt.j2")]
    trial = len(templates.SAMPLE_REASONS)
    assert len(title_renders) == trial + 1 + 1 + 1 + 1


def test_the_shipped_templates_render_within_the_limits() -> None:
    body = "a long comment, " * 300
    rendered = Renderer().render(
        "comment_reply", context(comment={"id": 9, "body": body, "excerpt": body[:80]})
    )

    assert body.strip() in rendered.message


def test_ordinary_numbers_in_formats_and_filters_still_render(tmp_path: Path) -> None:
    template_set(
        tmp_path,
        title=(
            '{{ "%05d" | format(comment.id) }} {{ "{:,}".format(1234567) }} '
            '{{ "Order 12345678: %s" % "ok" }} {{ post.title | center(30) | trim }} '
            "{{ reasons | batch(2) | list | length }}"
        ),
    )

    rendered = Renderer(tmp_path).render("broken", context())

    assert rendered.title == "00009 1,234,567 Order 12345678: ok Launch <plans> 1"


def test_a_broken_import_is_named_and_its_fix_is_taken_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = template_set(tmp_path, title="{{ recipient.username }}")
    (folder / "macros.j2").write_text(
        "{% macro shout(x) %}{{ x | upper }}{% endmacro %}"
    )
    renderer = Renderer(tmp_path)
    renderer.render("broken", context())
    _edit(
        folder / "message.txt.j2",
        "{% import 'broken/macros.j2' as m %}{{ m.shout(comment.body) }}",
    )
    assert renderer.render("broken", context()).message == "<B>HI</B> @BOB"

    with caplog.at_level(logging.INFO, logger="dispatcher.templates"):
        _edit(folder / "macros.j2", "{% macro shout(x) %}{{ x | upper }")
        fallen_back = renderer.render("broken", context()).message
        for _ in range(3):
            renderer.look("broken")  # still broken: not declared fixed
        _edit(folder / "macros.j2", "{% macro shout(x) %}{{ x | lower }}{% endmacro %}")
        renderer.look("broken")
        fixed = renderer.render("broken", context()).message

    assert fallen_back == "x"  # the version before the import
    assert fixed == "<b>hi</b> @bob"
    actions = [getattr(r, "action", "") for r in caplog.records]
    assert actions == ["template.broken", "template.fixed"]
    (broken,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "broken/macros.j2, which it imports or includes" in broken.getMessage()
    assert REGISTRY.get_sample_value("notiflow_dispatcher_templates_broken") == 0
