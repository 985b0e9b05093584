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

import contextlib
import csv
import errno
import io
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from selfkd.config import dump_yaml
from selfkd.engine.checkpoint import atomic_write_text
from selfkd.errors import CheckpointError, RunDirError

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
        try:
            return (self.path / CONFIG).exists() or self.last.exists()
        except OSError as exc:  # e.g. ENAMETOOLONG, EACCES on a parent folder
            raise RunDirError(
                f"cannot use run directory {self.path} ({exc.strerror or exc}); "
                "choose another run.out_dir or run.name"
            ) from None

    def temporaries(self) -> list[Path]:
        """Temporary files an atomic write left behind when its process was killed mid-write
        (``.NAME.*.tmp`` beside the run's files and checkpoints)."""
        found: list[Path] = []
        for folder in (self.path, self.path / "checkpoints"):
            with contextlib.suppress(OSError):
                found += [p for p in folder.glob(".*.tmp") if p.is_file()]
        return sorted(found)

    def clean_temporaries(self) -> None:
        """Delete :meth:`temporaries`. Only call it while holding the lock (:meth:`acquire`):
        then no other selfkd process is writing into this directory."""
        for path in self.temporaries():
            with contextlib.suppress(OSError):
                path.unlink()

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

    def remove_empty(self) -> None:
        """Remove a run folder that holds no run: only an empty log, the lock file and empty
        folders (what a run refused while starting leaves). Anything else keeps it."""
        with contextlib.suppress(OSError):
            log = self.path / "train.log"
            if log.is_file() and log.stat().st_size == 0:
                log.unlink()
            (self.path / ".in-use.lock").unlink(missing_ok=True)
            for folder in (self.path / "checkpoints", self.path):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Create the directory; check it is writable and not holding another run; delete the
        temporary files of writes a killed process left. Call it holding :meth:`acquire` (it
        raises before touching anything when the directory holds a run and neither flag is
        given)."""
        if self.holds_run() and not (resume or overwrite):
            if self.has_checkpoint():
                advice = "pass --resume to continue it, --overwrite to replace it"
            else:  # stopped (killed, failed) before its first checkpoint
                advice = (
                    "it stopped before its first checkpoint: pass --resume or --overwrite to "
                    "start it again"
                )
            raise RunDirError(
                f"run directory {self.path} already holds a run; {advice}, "
                "or choose another run.name"
            )
        probe = self.path / ".write-test"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
            probe.write_text("ok")
        except OSError as exc:
            raise RunDirError(
                f"cannot write to run directory {self.path} ({exc.strerror or exc}); "
                "set run.out_dir to a writable folder"
                + (" or free disk space" if exc.errno == errno.ENOSPC else "")
            ) from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()  # also the empty file a full disk leaves
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
        self.clean_temporaries()  # called under the lock: no other process writes here
        if resume:
            self.rows = self.read_rows()

    # --- writers ----------------------------------------------------------------------------
    def _write(self, name: str, text: str) -> None:
        """Write RUN/name atomically; a failed write (full disk) is a one-line RunDirError and
        leaves the file as it was."""
        try:
            atomic_write_text(self.path / name, text)
        except OSError as exc:
            raise RunDirError(
                f"could not write {self.path / name} ({exc.strerror or exc}); it is unchanged: "
                "free disk space and continue with --resume"
            ) from None

    def write_config(self, resolved: dict[str, Any]) -> None:
        self._write(CONFIG, dump_yaml(resolved))

    def read_rows(self) -> list[dict[str, Any]]:
        """The metrics rows written so far. A corrupt metrics.jsonl (e.g. truncated by a copy)
        is read from metrics.csv instead (the same rows); RunDirError when both are unusable."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        try:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            rows = self._rows_from_csv()
            if rows is None:
                raise RunDirError(
                    f"{path} is corrupt ({type(exc).__name__}) and metrics.csv cannot replace "
                    "it; repair or delete the broken line and resume again"
                ) from None
            import warnings

            warnings.warn(f"{path} is corrupt; using the rows of metrics.csv", stacklevel=2)
            return rows

    def _rows_from_csv(self) -> list[dict[str, Any]] | None:
        """The rows of metrics.csv with numbers parsed, or None if it is missing or corrupt."""
        try:
            with open(self.path / "metrics.csv", newline="") as handle:
                table = list(csv.DictReader(handle))
        except (OSError, UnicodeDecodeError, csv.Error):
            return None
        rows = []
        for record in table:
            if None in record or any(v is None for v in record.values()):
                return None  # a short (truncated) line
            row = {k: _parse_cell(v) for k, v in record.items()}
            if not isinstance(row.get("epoch"), int):
                return None
            rows.append({k: v for k, v in row.items() if v is not None})
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
        self._write("metrics.csv", buf.getvalue())
        self._write("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))

    def write_final(self, final: dict[str, Any]) -> None:
        clean = {k: _clean(v) for k, v in final.items()}
        self._write(FINAL, json.dumps(clean, indent=2, sort_keys=False) + "\n")

    def write_failure(self, exc: BaseException, facts: dict[str, Any]) -> None:
        """Mark the run as failed in final.json (reports list it; resuming is still possible),
        with the error's first line and ``facts``; a file that cannot be written is let be."""
        lines = str(exc).strip().splitlines()
        error = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]
        with contextlib.suppress(OSError):
            self.write_final({"status": "failed", "error": error, **facts})

    def logger(self, name: str, quiet: bool = False) -> logging.Logger:
        """A logger writing to RUN/train.log and (unless quiet) to stderr."""
        logger = logging.getLogger(f"selfkd.run.{name}.{os.getpid()}.{id(self)}")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        file_handler = _QuietFileHandler(self.path / "train.log")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
        if not quiet:
            console = logging.StreamHandler()
            console.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(console)
        return logger


def check_resumable(run: RunDir) -> None:
    """``--resume`` of ``run`` that has no checkpoint: fine when it holds a run that stopped
    before its first checkpoint (it starts again from epoch 1, nothing trained is lost), a
    CheckpointError when no run was ever started there (a mistyped run.name)."""
    if not run.holds_run():
        raise CheckpointError(
            f"nothing to resume in {run.path}: no run was started there (no config.yaml, no "
            "checkpoint); check run.name and run.out_dir, or drop --resume to start a new run"
        )


def check_start(run: RunDir, resume: bool, overwrite: bool) -> tuple[bool, bool, bool]:
    """Before any expensive work: refuse a folder that holds a run unless resuming or
    overwriting it (RunDirError); a --resume of a run that stopped before its first checkpoint
    starts it again. Returns ``(resume, overwrite, restarted)`` as they then hold."""
    if run.holds_run() and not (resume or overwrite):
        run.prepare(resume=False, overwrite=False)  # raises RunDirError
    restarted = resume and not run.has_checkpoint()
    if restarted:
        check_resumable(run)
        resume, overwrite = False, True
    return resume, overwrite, restarted


def open_run(
    run: RunDir, *, is_main: bool, resume: bool, overwrite: bool, name: str, quiet: bool
) -> logging.Logger:
    """Lock and prepare ``run`` and return its log (rank 0); other ranks get a silent log."""
    if not is_main:
        return null_logger(name)
    run.acquire()
    run.prepare(resume=resume, overwrite=overwrite)
    return run.logger(name, quiet=quiet)


def _parse_cell(text: str) -> Any:
    """A metrics.csv cell as the number it was written from ("" is None)."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class _QuietFileHandler(logging.FileHandler):
    """A log file that, when it cannot be written (full disk), says so in one line on stderr
    once and stops writing, instead of printing a traceback for every message."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not getattr(self, "_failed", False):
            self._failed = True
            print(f"warning: cannot write {self.baseFilename}; it stops here", file=sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(self, "_failed", False):
            super().emit(record)


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def null_logger(name: str) -> logging.Logger:
    """A logger that writes nothing (ranks other than 0 under DDP)."""
    logger = logging.getLogger(f"selfkd.run.{name}.{os.getpid()}.null")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def abandon(run: RunDir | None, log: logging.Logger | None, created: bool) -> None:
    """After a failed start: close the log, release the lock, and remove the run folder if this
    process ``created`` it and it holds no run (only the log, lock, empty checkpoints folder)."""
    if log is not None:
        close_logger(log)
    if run is None:
        return
    run.release()
    if created and not run.holds_run():
        run.remove_empty()
