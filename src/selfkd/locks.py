"""A blocking exclusive file lock shared by the processes of one machine (POSIX ``flock``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if absent) for the ``with`` block,
    waiting while another process holds it. Without ``fcntl`` (not POSIX) nothing is locked.
    The lock goes with the process, so one killed mid-block never leaves it taken."""
    with open(lock_file, "w") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
