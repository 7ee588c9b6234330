from __future__ import annotations

from pathlib import Path

import pytest
from jinja2 import UndefinedError

from dispatcher.templates import Renderer


def context(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "recipient": {"id": 2, "username": "bob", "display_name": "Bob"},
        "commenter": {"id": 3, "username": "carol", "display_name": "Zoë 🚀"},
        "post": {"id": 1, "title": "Launch <plans>"},
        "comment": {"id": 9, "body": "<b>hi</b> @bob", "excerpt": "<b>hi</b> @bob"},
        "reasons": ["mentioned"],
        "url": "http://example.test/?post=1#comment-9",
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


def test_reply_wording_depends_on_the_reason() -> None:
    renderer = Renderer()

    own = renderer.render("comment_reply", context(reasons=["post_author"]))
    other = renderer.render("comment_reply", context(reasons=["participant"]))

    assert "your post" in own.message
    assert "a post you follow" in other.message


def test_a_template_naming_an_unknown_variable_fails(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "title.txt.j2").write_text("{{ nobody.name }}")
    (folder / "message.txt.j2").write_text("x")
    (folder / "email.html.j2").write_text("x")

    with pytest.raises(UndefinedError):
        Renderer(tmp_path).render("broken", context())


def test_long_titles_are_shortened() -> None:
    rendered = Renderer().render(
        "comment_reply", context(post={"id": 1, "title": "x" * 500})
    )

    assert len(rendered.title) == 200
    assert rendered.title.endswith("…")
