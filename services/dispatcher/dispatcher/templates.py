"""Rendering a notification's title, text and HTML with Jinja2.

A template set is a folder named after the channel's ``template``, holding
``title.txt.j2``, ``message.txt.j2`` and ``email.html.j2``. Text templates are not
escaped; the HTML template is. Undefined variables are errors, so a template that
names something the dispatcher does not provide fails loudly in tests, not silently
in someone's inbox.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

DEFAULT_DIR = Path(__file__).with_name("templates")
MAX_TITLE_CHARS = 200


@dataclass(frozen=True)
class Rendered:
    title: str
    message: str
    html: str


class Renderer:
    def __init__(self, directory: Path = DEFAULT_DIR) -> None:
        self._env = Environment(
            loader=FileSystemLoader(str(directory)),
            undefined=StrictUndefined,
            autoescape=select_autoescape(enabled_extensions=("html.j2",)),
            keep_trailing_newline=False,
            auto_reload=True,
        )

    def render(self, template: str, context: dict[str, Any]) -> Rendered:
        title = self._env.get_template(f"{template}/title.txt.j2").render(context)
        message = self._env.get_template(f"{template}/message.txt.j2").render(context)
        html = self._env.get_template(f"{template}/email.html.j2").render(context)
        title = " ".join(title.split())
        if len(title) > MAX_TITLE_CHARS:
            title = title[: MAX_TITLE_CHARS - 1] + "…"
        return Rendered(title=title, message=message.strip(), html=html.strip())
