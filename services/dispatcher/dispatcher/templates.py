"""Rendering a notification's title, text and HTML with Jinja2.

A template set is a folder named after the channel's ``template``, holding
``title.txt.j2``, ``message.txt.j2`` and ``email.html.j2``, and optionally
``email.txt.j2``. The message is the text of every channel type; an email's text
part is ``email.txt.j2``, which gets the rendered message as ``message``, or, in a
set without one, the message itself. So what belongs to emails alone, such as the
link that turns them off (``unsubscribe_url``), stays out of the in-app inbox and
push. A set that names no ``unsubscribe_url`` still renders, and its emails still
carry the link in their ``List-Unsubscribe`` header.

Text templates are not escaped; the HTML template is. Undefined variables are
errors, so a template that names something the dispatcher does not provide fails
loudly in tests, not silently in someone's inbox.

Templates are read again when their files change, so an edit applies to the next
notification; a change is told by the file's stamp (:mod:`dispatcher.stamps`), not
by its modification time alone as Jinja2 would. An edit that breaks a template (it
does not parse, names something the dispatcher does not provide, renders nothing but
blanks, or its file is gone) does not stop notifications: each file keeps the last
version that rendered, which goes on being used, with one logged error naming the
file and the fault, until the file renders again. An ``email.txt.j2`` added broken
to a set that had none has no such version: emails go on taking the message as
their text, as they did, until it renders. Every new version of a file is
first rendered once for each reason someone is notified, alone and together, with
made-up values (names that are not ASCII among them), and is used only if it renders
for all of them: a version that fails only for some recipients (participants, say)
is broken for all. A version that passed and then fails on real values its trial did
not have falls back, for those values, to the version it replaced.
:meth:`Renderer.problem`, which checks a set before the channel configuration may
name it (at start, and on every edit of that file), tries the files as they are in
the same way: a fault that shows then refuses the set, and a set that passes has a
last good version of every file from then on.

Templates run in Jinja2's immutable sandbox, and within limits, so that a slip in
one cannot stop the dispatcher: each file may take at most
:data:`RENDER_CPU_SECONDS` of CPU to compile, and as much to render for one
notification, and write at most :data:`MAX_RENDERED_CHARS` characters; and what
would build one string, list or number larger than that (``*``, ``**``, a format's
width, a filter's size) is refused before it runs. A version that runs out of time
is broken until edited, like one failing its trial, so it costs that tenth of a
second once, not on every notification; one that writes too much for some values
is broken for those values only.

Every failure to render is a :class:`RenderError`. Jinja2's own ``TemplateNotFound``
is an ``OSError``, the shape of a lost database connection; raised as it is, it
would hold the event as if the database were away, retried for ever.
"""

from __future__ import annotations

import _weakrefset
import functools
import itertools
import logging
import posixpath
import re
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import jinja2.environment
import jinja2.loaders
import jinja2.utils
from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateNotFound,
    TemplateSyntaxError,
    select_autoescape,
)
from jinja2.loaders import split_template_path
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from contracts import metrics
from dispatcher import stamps

DEFAULT_DIR = Path(__file__).with_name("templates")
FILES = ("title.txt.j2", "message.txt.j2", "email.html.j2")
EMAIL_TEXT = "email.txt.j2"
MAX_TITLE_CHARS = 200
# What one file may write for one notification: twenty times the longest comment.
MAX_RENDERED_CHARS = 100_000
# The CPU one file may take to compile, or to render for one notification; the
# templates shipped take some 15 µs a file to render and 2 ms to compile.
RENDER_CPU_SECONDS = 0.1
# How long an edited file must stay unchanged before the dispatcher reads it
# again: a file written in place is not used half written.
SETTLE_SECONDS = 1.0
# What is used while a file is broken, as its error says.
LAST_GOOD_USED = "its last version that rendered is used until it is fixed"
NEW_EMAIL_TEXT_BROKEN = (
    "the set has never had a version of it that rendered, so emails take the "
    "message as their text until it is fixed"
)

logger = logging.getLogger(__name__)


class RenderError(Exception):
    """A template set could not render a notification: a bug to fix, not an outage."""


class _RendersNothing(Exception):
    """A template rendered to nothing but blanks: an empty subject or email."""


class _FailsTrial(Exception):
    """A new version of a template failed for one of the made-up recipients."""


class _OverLimit(Exception):
    """A render went past one of the limits every template runs within."""


class _OutOfTime(_OverLimit):
    """A render used up :data:`RENDER_CPU_SECONDS`."""


class _Bounded(ImmutableSandboxedEnvironment):
    """Jinja2's sandbox, which keeps templates away from Python's internals, from
    changing the values they are given (the files of a notification share them)
    and caps each ``range``; with what would build one string or list larger than
    any notification may be refused before it runs. One such call, which Python
    cannot interrupt, would otherwise take as much time and memory as it asks.
    """

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {**self.filters}
        for name in _SIZED_FILTERS:
            self.filters[name] = _sized(self.filters[name], name)
        self.filters["format"] = _formatting(self.filters["format"])

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if (
                    isinstance(sequence, str | bytes | list | tuple)
                    and isinstance(times, int)
                    and len(sequence) * times > MAX_RENDERED_CHARS
                ):
                    raise _OverLimit(
                        f"a * would make {len(sequence) * times:,} items, more "
                        f"than the {MAX_RENDERED_CHARS:,} a template may write"
                    )
        elif operator == "**":
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and abs(left) > 1
                and abs(left).bit_length() * right > MAX_RENDERED_CHARS * 4
            ):
                raise _OverLimit(
                    f"{left} ** {right} would have more digits than the "
                    f"{MAX_RENDERED_CHARS:,} characters a template may write"
                )
        elif isinstance(left, str):
            _refuse_wide(left, right if isinstance(right, tuple) else (right,))
        return super().call_binop(context, operator, left, right)

    def call(
        __self,  # Jinja2's own signature, so that any keyword may be passed on
        __context: Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if isinstance(getattr(__obj, "__self__", None), str):
            if __obj.__name__ in _SIZED_METHODS:
                _refuse_large(f"str.{__obj.__name__}", args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text: str = value.__self__

        @functools.wraps(wrapped)
        def checked(*args: Any, **kwargs: Any) -> str:
            given = [*args, *kwargs.values()]
            if value.__name__ == "format_map" and args and isinstance(args[0], dict):
                given += args[0].values()
            _refuse_wide(text, given)
            return wrapped(*args, **kwargs)

        return checked


# Filters and string methods whose numbers say how large a result to build.
_SIZED_FILTERS = ("center", "indent", "batch", "slice")
_SIZED_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
# A printf-style conversion's width and precision, and a format field's spec.
_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT_SPEC = re.compile(r"\{[^{}:]*:((?:[^{}]|\{[^{}]*\})*)\}")
_DIGITS = re.compile(r"\d+")


def _too_large(value: Any) -> bool:
    return isinstance(value, int) and value > MAX_RENDERED_CHARS


def _refuse_large(what: str, args: Iterable[Any], kwargs: dict[str, Any]) -> None:
    if any(_too_large(v) for v in (*args, *kwargs.values())):
        raise _OverLimit(
            f"{what} was asked for more than the {MAX_RENDERED_CHARS:,} characters "
            "a template may write"
        )


def _refuse_wide(text: str, args: Iterable[Any]) -> None:
    """Refuse a format string whose width or precision, written in it or taken
    from its arguments, is larger than anything a template may write."""
    from_args = False
    numbers: list[str] = []
    for match in _PRINTF.finditer(text):
        for part in match.groups():
            if part == "*":
                from_args = True
            elif part:
                numbers.append(part)
    for match in _FORMAT_SPEC.finditer(text):
        spec = match.group(1)
        from_args = from_args or "{" in spec
        numbers += _DIGITS.findall(spec)
    wide = any(
        len(n) > len(str(MAX_RENDERED_CHARS)) or int(n) > MAX_RENDERED_CHARS
        for n in numbers
    ) or (from_args and any(_too_large(a) for a in args))
    if wide:
        raise _OverLimit(
            "a format asks for a width or precision larger than the "
            f"{MAX_RENDERED_CHARS:,} characters a template may write"
        )


def _sized(function: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        # The value filtered comes first (after the environment, for some).
        _refuse_large(f"the {name} filter", args[1:], kwargs)
        return function(*args, **kwargs)

    return checked


def _formatting(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def checked(value: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            _refuse_wide(value, (*args, *kwargs.values()))
        return function(value, *args, **kwargs)

    return checked


class _CpuLimit:
    """Interrupts a render that has used up :data:`RENDER_CPU_SECONDS` of the
    process's CPU, counted by ``ITIMER_PROF``: a render held up by a busy or
    paused host is not charged for the wait.

    Only the main thread receives signals; a render elsewhere runs without the
    limit (the dispatcher renders on its event loop, in the main thread).
    """

    def __init__(self) -> None:
        self._armed = False
        self._installed = False
        self._main = threading.main_thread().ident

    def arm(self) -> bool:
        """Start counting afresh, if this thread can be interrupted; whether the
        count was off, so that the caller must disarm. Each file compiled or
        rendered inside a notification's render counts its own time."""
        if self._armed:
            self._start()
            return False
        if threading.get_ident() != self._main:
            return False
        if not self._installed:
            signal.signal(signal.SIGPROF, self._expired)
            self._installed = True
        self._armed = True
        self._start()
        return True

    def rearm(self) -> None:
        """Count afresh, if counting: after one version ran out of time, the
        version before it gets its own."""
        if self._armed:
            self._start()

    @staticmethod
    def _start() -> None:
        # Again and again, should one land where it is swallowed (Jinja2 folds
        # constant expressions while compiling, and gives up on any that raises).
        signal.setitimer(signal.ITIMER_PROF, RENDER_CPU_SECONDS, RENDER_CPU_SECONDS / 2)

    def disarm(self) -> None:
        # Disarmed first: a signal between the two lines then raises nothing.
        self._armed = False
        signal.setitimer(signal.ITIMER_PROF, 0)

    @contextmanager
    def armed(self) -> Iterator[None]:
        armed = self.arm()
        try:
            yield
        finally:
            if armed:
                self.disarm()

    def _expired(self, signum: int, frame: FrameType | None) -> None:
        if not self._armed:
            return
        code = frame.f_code if frame is not None else None
        if code is not None and (
            code.co_filename in _NOT_INTERRUPTED or code.co_name == "__del__"
        ):
            # Raised here, it would be lost in a finalizer (the garbage collector
            # calls them wherever it runs), or leave Jinja2's template cache or
            # this module's own records half changed. The timer rings again soon.
            return
        raise _OutOfTime(f"took more than {RENDER_CPU_SECONDS:g}s of CPU")


_CPU_LIMIT = _CpuLimit()
# Where a render's time running out is not raised: see _CpuLimit._expired.
_NOT_INTERRUPTED = frozenset(
    module.__file__
    for module in (weakref, _weakrefset, jinja2.utils, jinja2.environment, stamps)
    if module.__file__
) | {__file__, jinja2.loaders.__file__ or ""}


def _bounded_render(version: Template, context: dict[str, Any]) -> str:
    """``version`` rendered with ``context``, within the limits above.

    The length is checked once the text is written: a template cannot write much
    more than the limit within its time, and rendering in pieces to count them as
    they came cost a fifth more on every notification. Armed and disarmed by hand,
    which costs a third of what a context manager does; :meth:`Renderer.render`
    arms once for a notification, and each file then starts a fresh count.
    """
    armed = _CPU_LIMIT.arm()
    try:
        text = version.render(context)
    finally:
        if armed:
            _CPU_LIMIT.disarm()
    if len(text) > MAX_RENDERED_CHARS:
        raise _OverLimit(
            f"writes more than the {MAX_RENDERED_CHARS:,} characters a template may"
        )
    return text


def _elsewhere(path: str, exc: Exception) -> str | None:
    """The other template named by ``exc``, when it is about one that ``path``
    imports or includes rather than about ``path`` itself."""
    if isinstance(exc, TemplateSyntaxError | TemplateNotFound):
        name = exc.name
        if name and name != path:
            return name
    return None


# The reasons someone is notified of a comment, alone and together (the author of
# a post who has also commented on it is both post_author and participant), each
# tried by Renderer.problem and on every new version of a file.
SAMPLE_REASONS = tuple(
    reasons
    for size in (1, 2, 3)
    for reasons in itertools.combinations(
        ("post_author", "participant", "mentioned"), size
    )
)


def sample_context(reasons: tuple[str, ...]) -> dict[str, Any]:
    """Made-up values with every name the dispatcher gives a template; the names
    are not ASCII, as people's often are not."""
    return {
        "recipient": {"id": 2, "username": "bob", "display_name": "Böb Exämple"},
        "commenter": {"id": 3, "username": "carol", "display_name": "Zoë 🚀 Carol"},
        "post": {"id": 1, "title": "An example post"},
        "comment": {"id": 9, "body": "An example comment", "excerpt": "An example"},
        "reasons": list(reasons),
        "url": "https://notiflow.example/?post=1#comment-9",
        "unsubscribe_url": "https://notiflow.example/unsubscribe?token=example",
    }


def _sample(name: str, reasons: tuple[str, ...]) -> dict[str, Any]:
    """The made-up values file ``name`` is tried with: an email's text also gets
    the message it is built around."""
    context = sample_context(reasons)
    if name == EMAIL_TEXT:
        context["message"] = "An example message"
    return context


@dataclass(frozen=True)
class Rendered:
    title: str
    message: str
    html: str
    # The text part of an email: the message, and what only emails carry.
    email_text: str


class _StampedLoader(FileSystemLoader):
    """Jinja2's loader, whose templates are out of date once their file's stamp
    changes rather than its modification time only, and has then kept its new
    stamp for ``settle_seconds``.

    A file written in place passes through versions cut short, each of which
    may parse and render (a sentence stopped mid-word): while its stamp keeps
    changing, the version read before goes on being used. A leading byte order
    mark, which some editors write, is no part of the text.
    """

    def __init__(self, directory: str, settle_seconds: float) -> None:
        super().__init__(directory)
        self._settle = settle_seconds
        # Each changed file's newest stamp, and when it was first seen.
        self._changes: dict[str, tuple[stamps.Stamp, float]] = {}
        # The stamp of the text each file's latest version was compiled from,
        # and of each file's text read and not compiled yet.
        self._loaded: dict[str, stamps.Stamp] = {}
        self._read: dict[str, stamps.Stamp] = {}
        # Each file whose text took too long to compile: its stamp then, and why.
        self._too_slow: dict[str, tuple[stamps.Stamp, _OutOfTime]] = {}

    def load(
        self,
        environment: Environment,
        name: str,
        globals: MutableMapping[str, Any] | None = None,
    ) -> Template:
        filename = self._filename(name)
        slow = self._too_slow.get(filename)
        if slow is not None and self._stamp(filename) == slow[0]:
            # Compiled again only once the file changes, not on every use.
            raise slow[1]
        try:
            with _CPU_LIMIT.armed():
                template = super().load(environment, name, globals)
        except _OutOfTime as exc:
            self._read.pop(filename, None)
            slow_compile = _OutOfTime(f"{exc} to compile")
            if (stamp := self._stamp(filename)) is not None:
                self._too_slow[filename] = (stamp, slow_compile)
            raise slow_compile from None
        self._too_slow.pop(filename, None)
        if template.filename is not None and template.filename in self._read:
            self._loaded[template.filename] = self._read.pop(template.filename)
        return template

    def _filename(self, name: str) -> str:
        return posixpath.join(self.searchpath[0], *split_template_path(name))

    @staticmethod
    def _stamp(filename: str) -> stamps.Stamp | None:
        try:
            return stamps.stamp(filename)
        except OSError:
            return None

    def on_disk(self, filename: str | None) -> bool:
        """Whether the file holds the text its latest version was compiled from:
        not while an edit settles, nor while the edited text does not compile."""
        if filename is None or filename not in self._loaded:
            return False
        try:
            return stamps.stamp(filename) == self._loaded[filename]
        except OSError:
            return False

    def get_source(
        self, environment: Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        # Stamped before the text is read: an edit landing while it is read then
        # leaves another stamp, and the next look reads the file again.
        _, filename, _ = super().get_source(environment, template)
        try:
            before = stamps.stamp(filename)
        except OSError:
            raise TemplateNotFound(template) from None
        text, filename, _ = super().get_source(environment, template)
        self._read[filename] = before

        def uptodate() -> bool:
            try:
                now = stamps.stamp(filename)
            except OSError:
                return False
            return now == before or self._settling(filename, now)

        return text.lstrip("\ufeff"), filename, uptodate

    def _settling(self, filename: str, stamp: stamps.Stamp) -> bool:
        """Whether the file, changed to ``stamp``, is still too freshly changed
        to be read again."""
        if self._settle <= 0:
            return False
        now = time.monotonic()
        seen = self._changes.get(filename)
        if seen is None or seen[0] != stamp:
            self._changes[filename] = (stamp, now)
            return True
        # Kept once settled: until a version of the new text compiles, the
        # version before it stays out of date, not up to date again.
        return now - seen[1] < self._settle


class Renderer:
    def __init__(
        self, directory: Path = DEFAULT_DIR, settle_seconds: float = 0
    ) -> None:
        """Templates from ``directory``; an edited file is taken up once it has
        stayed unchanged for ``settle_seconds`` (the dispatcher's
        :data:`SETTLE_SECONDS`; none by default, for tests)."""
        self._directory = directory
        self._loader = _StampedLoader(str(directory), settle_seconds)
        self._env = _Bounded(
            loader=self._loader,
            undefined=StrictUndefined,
            autoescape=select_autoescape(enabled_extensions=("html.j2",)),
            keep_trailing_newline=False,
            auto_reload=True,
        )
        # Each file's last version that rendered, the one before it, and the
        # faults logged since.
        self._good: dict[str, Template] = {}
        self._before: dict[str, Template] = {}
        # The fault logged for each file since it last rendered, and the version
        # that showed it (None for a file that could not be read or parsed).
        self._reported: dict[str, tuple[str, Template | None]] = {}
        # Each file's latest version that failed its trial, or ran out of time
        # on real values, and how: not tried again.
        self._failed_trial: dict[str, tuple[Template, Exception]] = {}

    def problem(self, template: str) -> str | None:
        """Why the template set ``template`` cannot be used, or None if it can."""
        try:
            found = (self._directory / template).is_dir()
        except OSError as exc:  # a name too long for the file system, say
            return f"cannot be looked up in {self._directory}: {exc.strerror or exc}"
        if not found:
            return f"not found in {self._directory}"
        for name in (*FILES, EMAIL_TEXT):
            path = f"{template}/{name}"
            try:
                # The files as they are now, not the last versions kept for them.
                self._trial(path, name, self._env.get_template(path))
            except TemplateNotFound:
                if name == EMAIL_TEXT:
                    continue
                return f"{name} is missing from {self._directory / template}"
            except TemplateSyntaxError as exc:
                return f"{self._directory / path}, line {exc.lineno}: {exc.message}"
            except OSError as exc:
                return f"{self._directory / path} cannot be read: {exc.strerror or exc}"
            except _FailsTrial as exc:
                return str(exc)
            except _OverLimit as exc:
                return self._fault(path, exc)
        for reasons in SAMPLE_REASONS:
            try:
                self.render(template, sample_context(reasons))
            except RenderError as exc:
                return f"for a recipient {' and '.join(reasons)}: {exc}"
        return None

    def render(self, template: str, context: dict[str, Any]) -> Rendered:
        """The notification ``template`` makes of ``context``; :class:`RenderError`
        if it cannot. Its files share :data:`RENDER_CPU_SECONDS`."""
        armed = _CPU_LIMIT.arm()
        try:
            return self._render_all(template, context)
        finally:
            if armed:
                _CPU_LIMIT.disarm()

    def _render_all(self, template: str, context: dict[str, Any]) -> Rendered:
        title = self._render(template, "title.txt.j2", context)
        message = self._render(template, "message.txt.j2", context).strip()
        html = self._render(template, "email.html.j2", context)
        email_text = message
        try:
            # Looked up as the other templates are, through the loader's cache.
            self._env.get_template(f"{template}/{EMAIL_TEXT}")
        except TemplateNotFound:
            # A set may have none; one that had, and has lost it, is broken like
            # any set missing a file, and keeps the version it had.
            has_email_text = f"{template}/{EMAIL_TEXT}" in self._good
        except Exception:
            has_email_text = True  # there but broken: rendering says how
        else:
            has_email_text = True
        if has_email_text:
            email_text = self._email_text(template, {**context, "message": message})
        title = " ".join(title.split())
        if len(title) > MAX_TITLE_CHARS:
            title = title[: MAX_TITLE_CHARS - 1] + "…"
        return Rendered(
            title=title, message=message, html=html.strip(), email_text=email_text
        )

    def _email_text(self, template: str, context: dict[str, Any]) -> str:
        path = f"{template}/{EMAIL_TEXT}"
        try:
            return self._render(template, EMAIL_TEXT, context).strip()
        except RenderError as exc:
            if path in self._good:
                raise
            # Added to a set that had none, and broken from the start: the set
            # goes on as it was, the message being the email's text.
            self._report(path, str(exc), meanwhile=NEW_EMAIL_TEXT_BROKEN)
            return str(context["message"])

    def look(self, template: str) -> None:
        """Take up the files of ``template`` as they are on disk now, as rendering
        would, without rendering a notification.

        A new version that passes its trial becomes the file's last good version,
        the one before it kept to fall back on; one that fails is reported, once,
        as rendering reports it. What real values have shown of a version is left
        as it is: a version failing on them is not declared fixed by made-up ones.
        """
        for name in (*FILES, EMAIL_TEXT):
            path = f"{template}/{name}"
            current: Template | None = None
            try:
                current = self._env.get_template(path)
                if current is self._good.get(path):
                    # Unchanged, or put back as it was (a file moved away and
                    # back, a link returned to its release): fixed, if it was
                    # reported broken meanwhile, unless what it imports still is.
                    reported = self._reported.get(path)
                    if (
                        reported is None
                        or reported[1] is not None
                        or self._renders(name, current)
                    ):
                        self._adopt(path, current)
                    continue
                self._trial(path, name, current)
            except TemplateNotFound:
                if name == EMAIL_TEXT and path not in self._good:
                    continue  # a set without one, and never had one
                self._report(path, self._fault(path, TemplateNotFound(path)))
                continue
            except Exception as exc:
                fault = self._fault(path, exc)
                if path in self._good:
                    self._report(path, fault, current)
                elif name == EMAIL_TEXT:
                    self._report(path, fault, current, NEW_EMAIL_TEXT_BROKEN)
                continue
            self._adopt(path, current)

    def forget_all_but(self, templates: Iterable[str]) -> None:
        """Stop counting as broken the files of sets other than ``templates``,
        the ones the channel configuration names: no notification uses the rest."""
        used = set(templates)
        for path in [p for p in self._reported if p.split("/", 1)[0] not in used]:
            del self._reported[path]
        metrics.TEMPLATES_BROKEN.set(len(self._reported))

    def _adopt(self, path: str, version: Template) -> None:
        """Make ``version`` the file's last good one, keeping the one it replaces."""
        good = self._good.get(path)
        replaced = good is not None and good is not version
        if good is not version:
            if good is not None:
                self._before[path] = good
            self._good[path] = version
        reported = self._reported.get(path)
        # Fixed once another version renders; the version a fault was seen in
        # may render other values, and is not fixed by that. Nor is the version
        # still served while the file holds text that does not compile, or an
        # edit that has not settled: only the file's text as it is on disk.
        if (
            reported is not None
            and reported[1] is not version
            and self._loader.on_disk(version.filename)
        ):
            del self._reported[path]
            metrics.TEMPLATES_BROKEN.set(len(self._reported))
            logger.info(
                "template %s renders again",
                path,
                extra={"action": "template.fixed"},
            )
        elif replaced:
            # So that an operator sees an edit taken up, as a reload of the
            # channel configuration is.
            logger.info(
                "template %s: the edited version is in use",
                path,
                extra={"action": "template.updated"},
            )

    def _report(
        self,
        path: str,
        fault: str,
        version: Template | None = None,
        meanwhile: str = LAST_GOOD_USED,
    ) -> None:
        if self._reported.get(path, ("", None))[0] != fault:
            self._reported[path] = (fault, version)
            metrics.TEMPLATES_BROKEN.set(len(self._reported))
            logger.error(
                "%s; %s", fault, meanwhile, extra={"action": "template.broken"}
            )

    def _render(self, template: str, name: str, context: dict[str, Any]) -> str:
        path = f"{template}/{name}"
        current: Template | None = None
        try:
            current = self._env.get_template(path)
            failed = self._failed_trial.get(path)
            if failed is not None and failed[0] is current:
                raise failed[1]
            if current is not self._good.get(path):
                self._trial(path, name, current)
            try:
                text = _bounded_render(current, context)
            except _OutOfTime as exc:
                self._failed_trial[path] = (current, exc)
                raise
            if not text.strip():
                raise _RendersNothing(f"template {path} renders nothing but blanks")
        except Exception as exc:
            # Whatever went wrong, and however long it took, the version to fall
            # back on has its own time.
            _CPU_LIMIT.rearm()
            fault = self._fault(path, exc)
            # The last version that rendered; or, when that is the version failing
            # now, on values its trial did not have, the one it replaced.
            earlier = [
                version
                for version in (self._good.get(path), self._before.get(path))
                if version is not None and version is not current
            ]
            if not earlier:
                # Never rendered, and nothing to fall back on.
                raise RenderError(fault) from exc
            # A fault in a file it imports is not this version's: it renders
            # again, and is fixed, once that file is.
            at_fault = None if _elsewhere(path, exc) else current
            self._report(path, fault, at_fault)
            for version in earlier:
                try:
                    return _bounded_render(version, context)
                except Exception:
                    continue
            raise RenderError(fault) from exc
        self._adopt(path, current)
        return text

    def _renders(self, name: str, version: Template) -> bool:
        """Whether ``version`` renders made-up values, as its trial did once."""
        values = _sample(name, SAMPLE_REASONS[0])
        try:
            return bool(_bounded_render(version, values).strip())
        except Exception:
            return False

    def _trial(self, path: str, name: str, version: Template) -> None:
        """Raise unless ``version`` renders for every reason to be notified.

        A new version of a file is tried, once, as :meth:`problem` tries a set:
        one that fails only for some recipients (a name used only for
        participants, say) would otherwise become the last good version on the
        first recipient it rendered for, and leave nothing to fall back on for
        the others.
        """
        failed = self._failed_trial.get(path)
        if failed is not None and failed[0] is version:
            raise failed[1]
        for reasons in SAMPLE_REASONS:
            try:
                if not _bounded_render(version, _sample(name, reasons)).strip():
                    raise _RendersNothing(f"template {path} renders nothing but blanks")
            except Exception as exc:
                fault = _FailsTrial(
                    f"for a recipient {' and '.join(reasons)}: {self._fault(path, exc)}"
                )
                self._failed_trial[path] = (version, fault)
                raise fault from exc
        self._failed_trial.pop(path, None)

    def _fault(self, path: str, exc: Exception) -> str:
        if isinstance(exc, _RendersNothing | _FailsTrial):
            return str(exc)
        if isinstance(exc, _OverLimit):
            return f"template {path} failed: {exc}"
        if isinstance(exc, TemplateNotFound):
            if (elsewhere := _elsewhere(path, exc)) is not None:
                return f"template {path} failed: {elsewhere} not found"
            return f"template {path} not found in {self._directory}"
        if isinstance(exc, TemplateSyntaxError):
            if (elsewhere := _elsewhere(path, exc)) is not None:
                return (
                    f"template {path} failed: {elsewhere}, which it imports or "
                    f"includes, line {exc.lineno}: {exc.message}"
                )
            return f"template {path} failed: line {exc.lineno}: {exc.message}"
        # A filter or expression of the template raised: the template's bug.
        return f"template {path} failed: {exc!r}"
