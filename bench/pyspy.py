"""Sampling the services with py-spy under load, and reading the samples back.

py-spy is not a dependency: install it into the environment for a profiling run
(``uv pip install py-spy``). It writes collapsed stacks (``--format raw``): one
line per distinct stack, frames root first, separated by ``;``, then the count.

Only the thread holding the GIL is sampled (``--gil``): in a one-process asyncio
service that is where the Python CPU time goes, and the anyio worker threads that
wait for work are left out. The services run on uvloop, whose loop is native code:
samples that stop at ``Runner.run`` are the loop itself (polling, socket reads and
writes, callback scheduling), with the GIL held.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# Frames of ours that wrap everything and say nothing about where time goes.
_ENTRY = {"<module>", "main", "serve"}

# "function (path/to/file.py:123)" -> function and file, without the line.
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


def py_spy() -> str | None:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or (
        shutil.which("py-spy")
    )


def start(pid: int, seconds: int, out: Path, rate: int = 50) -> subprocess.Popen[bytes]:
    """Record ``pid`` for ``seconds`` in the background; raw stacks to ``out``."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed: uv pip install py-spy")
    return subprocess.Popen(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            str(rate),
            "--nonblocking",
            "--gil",
            "--full-filenames",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _frame(text: str) -> tuple[str, str]:
    match = _FRAME.match(text.strip())
    if match is None:
        return text.strip(), ""
    return match["func"], match["file"]


def _where(path: str) -> str:
    """The library or module a file belongs to, for grouping."""
    marker = "site-packages/"
    if marker in path:
        return path.split(marker, 1)[1].split("/", 1)[0]
    for ours in ("services/", "libs/contracts/"):
        if ours in path:
            rest = path.split(ours, 1)[1]
            return "notiflow:" + rest.split("/", 1)[0]
    name = Path(path).name
    parent = Path(path).parent.name
    if parent.startswith("python3"):
        return "stdlib:" + name.removesuffix(".py")
    return f"stdlib:{parent}" if parent else name


def summarise(raw: str, top: int = 12) -> dict[str, Any]:
    """Where the samples were: by library and function of the running frame, and
    which of our functions were on the stack (inclusive time)."""
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    by_library: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_frame(f) for f in stack.split(";") if f.strip()]
        # The first frame of a raw stack is the thread; real frames follow.
        frames = [f for f in frames if f[1]]
        if not frames:
            continue
        func, path = frames[-1]
        self_time[f"{func} ({_short(path)})"] += count
        by_library[_where(path)] += count
        for name in {
            f"{fn} ({_short(p)})"
            for fn, p in frames
            if _where(p).startswith("notiflow:") and fn not in _ENTRY
        }:
            total_time[name] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [
            (name, round(100 * n / samples, 1)) for name, n in counter.most_common(top)
        ]

    return {
        "samples": samples,
        "self_pct": share(self_time) if samples else [],
        "total_pct": share(total_time) if samples else [],
        "library_pct": share(by_library) if samples else [],
    }


def _short(path: str) -> str:
    for marker in ("site-packages/", "services/", "libs/contracts/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return "/".join(Path(path).parts[-2:])


def format_text(profiles: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, found in profiles.items():
        if "error" in found:
            lines.append(f"{name}: {found['error']}")
            continue
        lines.append(f"{name} ({found['samples']} samples)")
        lines.append("  by library of the running frame:")
        for what, pct in found["library_pct"][:8]:
            lines.append(f"    {pct:5.1f}%  {what}")
        lines.append("  self time:")
        for what, pct in found["self_pct"][:8]:
            lines.append(f"    {pct:5.1f}%  {what}")
        lines.append("  our functions on the stack (inclusive):")
        for what, pct in found["total_pct"][:12]:
            lines.append(f"    {pct:5.1f}%  {what}")
    return "\n".join(lines)
