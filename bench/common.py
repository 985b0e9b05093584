"""Shared helpers of the benchmark scripts: timing and updating sections of docs/benchmarks.md.

A benchmark owns one section of a markdown file, delimited by ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; :func:`update_section` replaces only that section, so several
benchmarks can write to the same file.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def update_section(path: str | os.PathLike, name: str, markdown: str) -> None:
    """Replace the text between the markers of section ``name`` in ``path`` with ``markdown``.

    The section is appended if absent (the file is created if needed). The file is rewritten
    atomically (temporary file in the same folder, then ``os.replace``).
    """
    path = Path(path)
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    body = f"{start}\n{markdown.strip(chr(10))}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        text = text[:i] + body + text[j + len(end) :]
    elif i >= 0 or j >= 0:
        raise ValueError(f"{path}: section {name!r} has only one of its markers {start} {end}")
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def time_it(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 1
) -> dict[str, list[float]]:
    """Like :func:`time_it` for several functions, alternating them in every repeat.

    On a shared machine the load changes over time; alternating exposes every function to the
    same conditions, so their ratio is more trustworthy than with back-to-back blocks.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def environment() -> dict[str, str]:
    """Versions and hardware facts worth printing next to any number."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "machine": platform.machine(),
        "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg())
        if hasattr(os, "getloadavg")
        else "n/a",
    }


def command_line() -> str:
    """The command that ran this script, for copying into a benchmark table."""
    return "PYTHONPATH=src python " + shlex.join(sys.argv)


def finish(lines: list[str], section: str, write: str | None) -> str:
    """Append the environment and command lines, print, and update ``section`` of ``write``."""
    text = "\n".join(
        [
            *lines,
            "",
            "Environment: " + ", ".join(f"{k} {v}" for k, v in environment().items()) + ".",
            f"Command: `{command_line()}`",
        ]
    )
    print(text)
    if write:
        update_section(write, section, text)
    return text
