"""The run directory: resolved config, per-epoch metrics (CSV + JSON lines), final metrics,
checkpoints and a log file. Every file is written atomically (temporary file, then rename).

Layout::

    RUN/config.yaml          resolved config (every default filled in, dataset statistics)
    RUN/metrics.csv          one row per epoch: lr, every loss term, train and test metrics
    RUN/metrics.jsonl        the same rows as JSON lines
    RUN/final.json           metrics of the last epoch (+ temperature scaling), costs, status
    RUN/train.log            the log
    RUN/checkpoints/last.pt  written after every epoch; best.pt by run.best_metric;
                             last.prev.pt is the one last.pt replaced (fallback if corrupt)
    RUN/tensorboard/         optional event files
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from selfkd.config import dump_yaml
from selfkd.engine.checkpoint import atomic_write_text
from selfkd.errors import RunDirError

CONFIG = "config.yaml"
FINAL = "final.json"
LAST = "checkpoints/last.pt"
LAST_PREVIOUS = "checkpoints/last.prev.pt"
BEST = "checkpoints/best.pt"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunDir:
    """A run's directory; ``prepare`` refuses to reuse a directory that already holds a run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []

    # --- state ------------------------------------------------------------------------------
    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def last_previous(self) -> Path:
        """The checkpoint ``last.pt`` replaced (one epoch older), kept as a fallback."""
        return self.path / LAST_PREVIOUS

    def has_checkpoint(self) -> bool:
        return self.last.is_file() or self.last_previous.is_file()

    @property
    def best(self) -> Path:
        return self.path / BEST

    def holds_run(self) -> bool:
        return (self.path / CONFIG).exists() or self.last.exists()

    def is_finished(self) -> bool:
        final = self.read_final()
        return bool(final) and final.get("status") == "finished"

    def read_final(self) -> dict[str, Any] | None:
        path = self.path / FINAL
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def acquire(self) -> None:
        """Take an exclusive lock on this run directory (``.in-use.lock``) for this process.

        Two processes training one run directory would overwrite each other's checkpoints;
        the second gets a RunDirError. The lock is released by :meth:`release` or when the
        process exits (also on SIGKILL), so a crashed run never stays locked.
        """
        if getattr(self, "_lock", None) is not None:
            return
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / ".in-use.lock", "w")  # noqa: SIM115 (held until release)
        except OSError as exc:
            raise RunDirError(
                f"cannot write to run directory {self.path} ({exc.strerror or exc}); "
                "set run.out_dir to a writable folder"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise RunDirError(
                f"run directory {self.path} is in use by another selfkd process; wait for it "
                "to finish or choose another run.name"
            ) from None
        self._lock = handle

    def release(self) -> None:
        handle = getattr(self, "_lock", None)
        if handle is not None:
            handle.close()
            self._lock = None

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Create the directory; check it is writable and not holding another run."""
        if self.holds_run() and not (resume or overwrite):
            raise RunDirError(
                f"run directory {self.path} already holds a run; pass --resume to continue it, "
                "--overwrite to replace it, or choose another run.name"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(
                f"cannot write to run directory {self.path} ({exc.strerror or exc}); "
                "set run.out_dir to a writable folder"
            ) from None
        if overwrite and not resume:
            names = (
                CONFIG,
                FINAL,
                "metrics.csv",
                "metrics.jsonl",
                LAST,
                LAST_PREVIOUS,
                BEST,
                "train.log",
            )
            for name in names:
                with_path = self.path / name
                if with_path.exists():
                    with_path.unlink()
        if resume:
            self.rows = self.read_rows()

    # --- writers ----------------------------------------------------------------------------
    def write_config(self, resolved: dict[str, Any]) -> None:
        atomic_write_text(self.path / CONFIG, dump_yaml(resolved))

    def read_rows(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
        return rows

    def append_row(self, row: dict[str, Any]) -> None:
        """Add one epoch's row and rewrite metrics.csv and metrics.jsonl atomically."""
        self.rows = [r for r in self.rows if r.get("epoch") != row.get("epoch")]
        self.rows.append({k: _clean(v) for k, v in row.items()})
        self.rows.sort(key=lambda r: r.get("epoch", 0))
        columns: list[str] = []
        for r in self.rows:
            for key in r:
                if key not in columns:
                    columns.append(key)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
        atomic_write_text(self.path / "metrics.csv", buf.getvalue())
        atomic_write_text(
            self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows)
        )

    def write_final(self, final: dict[str, Any]) -> None:
        clean = {k: _clean(v) for k, v in final.items()}
        atomic_write_text(self.path / FINAL, json.dumps(clean, indent=2, sort_keys=False) + "\n")

    def logger(self, name: str, quiet: bool = False) -> logging.Logger:
        """A logger writing to RUN/train.log and (unless quiet) to stderr."""
        logger = logging.getLogger(f"selfkd.run.{name}.{os.getpid()}.{id(self)}")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        file_handler = logging.FileHandler(self.path / "train.log")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
        if not quiet:
            console = logging.StreamHandler()
            console.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(console)
        return logger


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
