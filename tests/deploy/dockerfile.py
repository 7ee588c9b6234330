"""Just enough of a Dockerfile reader to check the image recipe without building it.

There is no Docker engine on the machines that run the tests, so the stages are
read from the text: instructions with their continuation lines joined, grouped by
``FROM``, with build arguments substituted from their defaults.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array form of CMD, ENTRYPOINT and the like, if used."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        return list(json.loads(text))

    def flags(self) -> tuple[dict[str, str], str]:
        """Leading ``--name=value`` options and the rest of the arguments."""
        options = {}
        rest = self.args.strip()
        while rest.startswith("--"):
            word, _, rest = rest.partition(" ")
            name, _, value = word[2:].partition("=")
            options.setdefault(name, value)
            rest = rest.lstrip()
        return options, rest


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]

    def chain(self, target: str) -> list[Stage]:
        """The target and the stages it is built FROM, nearest first."""
        found = []
        name: str | None = target
        while name in self.stages:
            stage = self.stages[name]
            found.append(stage)
            name = stage.base
        return found

    def resolved(self, target: str, keyword: str) -> Instruction | None:
        """The instruction in effect for the target: the last one along its chain."""
        for stage in self.chain(target):
            matches = stage.all(keyword)
            if matches:
                return matches[-1]
        return None

    def image(self, target: str) -> str:
        """The external image the target's chain starts from."""
        return self.chain(target)[-1].base

    def env(self, target: str) -> dict[str, str]:
        values: dict[str, str] = {}
        for stage in reversed(self.chain(target)):
            for instruction in stage.all("ENV"):
                for word in shlex.split(instruction.args):
                    key, _, value = word.partition("=")
                    values[key] = value
        return values


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def _substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: values.get(m.group(1) or m.group(2), m.group(0)),
        text,
    )


def parse(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            words = _substitute(args, global_args).split()
            words = [w for w in words if not w.startswith("--platform")]
            base = words[0]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else base
            current = Stage(name=name, base=base)
            stages[name] = current
        elif current is None and keyword == "ARG":
            key, _, default = args.partition("=")
            global_args[key] = default
        elif current is not None:
            current.instructions.append(Instruction(keyword, args))
    return Dockerfile(global_args, stages)


def ignore_patterns(path: Path) -> list[tuple[bool, str]]:
    """(negated, pattern) pairs of a .dockerignore, in order."""
    patterns = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        patterns.append((negated, pattern))
    return patterns


def _matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches the path or any folder above it."""
    parts = path.split("/")
    for end in range(1, len(parts) + 1):
        candidate = "/".join(parts[:end])
        if _glob(pattern, candidate):
            return True
    return False


def _glob(pattern: str, path: str) -> bool:
    if pattern.startswith("**/"):
        rest = pattern[3:]
        segments = path.split("/")
        return any(_glob(rest, "/".join(segments[i:])) for i in range(len(segments)))
    pattern_parts = pattern.split("/")
    path_parts = path.split("/")
    if len(pattern_parts) != len(path_parts):
        return False
    return all(
        fnmatch.fnmatchcase(part, glob)
        for part, glob in zip(path_parts, pattern_parts, strict=True)
    )


def ignored(patterns: list[tuple[bool, str]], path: str) -> bool:
    """Whether the build context leaves ``path`` out; the last match decides."""
    result = False
    for negated, pattern in patterns:
        if _matches(pattern, path):
            result = not negated
    return result
