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

Templates run in Jinja2's sandbox, and within limits, so that a slip in one cannot
stop the dispatcher: the files of one notification may take at most
:data:`RENDER_CPU_SECONDS` of CPU together, and each write at most
:data:`MAX_RENDERED_CHARS` characters, and a ``*`` or ``**`` that
would make a string, list or number larger than that is refused before it runs.
A version that runs out of time is broken for good, like one failing its trial, so
it costs that second once, not on every notification; one that writes too much for
some values is broken for those values only.

Every failure to render is a :class:`RenderError`. Jinja2's own ``TemplateNotFound``
is an ``OSError``, the shape of a lost database connection; raised as it is, it
would hold the event as if the database were away, retried for ever.
"""

from __future__ import annotations

import itertools
import logging
import posixpath
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from jinja2.sandbox import SandboxedEnvironment

from contracts import metrics
from dispatcher import stamps

DEFAULT_DIR = Path(__file__).with_name("templates")
FILES = ("title.txt.j2", "message.txt.j2", "email.html.j2")
EMAIL_TEXT = "email.txt.j2"
MAX_TITLE_CHARS = 200
# What one file may write for one notification: twenty times the longest comment.
MAX_RENDERED_CHARS = 100_000
# The CPU the files of one notification may take to compile and render; the
# templates shipped take some 60 µs to render and 2 ms a file to compile.
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


class _Bounded(SandboxedEnvironment):
    """Jinja2's sandbox, which keeps templates away from Python's internals and
    caps each ``range``, with ``*`` and ``**`` checked before they build something
    larger than any notification may be."""

    intercepted_binops = frozenset({"*", "**"})

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
        elif (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and abs(left) > 1
            and abs(left).bit_length() * right > MAX_RENDERED_CHARS * 4
        ):
            raise _OverLimit(
                f"{left} ** {right} would have more digits than the "
                f"{MAX_RENDERED_CHARS:,} characters a template may write"
            )
        return super().call_binop(context, operator, left, right)


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
        """Start counting, if this thread can be interrupted and no count runs
        already (a render inside a render shares its time); whether it did, and
        so must disarm."""
        if self._armed or threading.get_ident() != self._main:
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

    def _expired(self, signum: int, frame: object) -> None:
        if self._armed:
            raise _OutOfTime(f"took more than {RENDER_CPU_SECONDS:g}s of CPU")


_CPU_LIMIT = _CpuLimit()


def _bounded_render(version: Template, context: dict[str, Any]) -> str:
    """``version`` rendered with ``context``, within the limits above.

    The length is checked once the text is written: a template cannot write much
    more than the limit within its time, and rendering in pieces to count them as
    they came cost a fifth more on every notification. Armed and disarmed by hand,
    which costs a third of what a context manager does; and
    :meth:`Renderer.render` arms once for every file of a notification.
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
                    # reported broken meanwhile.
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
            self._report(path, fault, current)
            for version in earlier:
                try:
                    return _bounded_render(version, context)
                except Exception:
                    continue
            raise RenderError(fault) from exc
        self._adopt(path, current)
        return text

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
            context = sample_context(reasons)
            if name == EMAIL_TEXT:
                context["message"] = "An example message"
            try:
                if not _bounded_render(version, context).strip():
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
            return f"template {path} not found in {self._directory}"
        if isinstance(exc, TemplateSyntaxError):
            return f"template {path} failed: line {exc.lineno}: {exc.message}"
        # A filter or expression of the template raised: the template's bug.
        return f"template {path} failed: {exc!r}"
