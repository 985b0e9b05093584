"""A blocking exclusive file lock shared by the processes of one machine (POSIX ``flock``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, *, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if absent) for the ``with`` block,
    waiting while another process holds it. Without ``fcntl`` (not POSIX) nothing is locked.
    The lock goes with the process, so one killed mid-block never leaves it taken.

    ``remove`` deletes the lock file on release, so that nothing is left behind. A waiter that
    was granted the lock on the file just deleted notices that the path now names another file
    (or none) and waits again on the path's current file, so that two processes never hold the
    lock at once.
    """
    if fcntl is None:
        yield
        return
    handle = _acquire(lock_file)
    try:
        yield
    finally:
        if remove:
            with contextlib.suppress(OSError):
                lock_file.unlink()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _acquire(lock_file: Path) -> IO[str]:
    """Open ``lock_file`` and lock it, retrying until the locked file is still the one the path
    names (a holder using ``remove`` may delete it between our open and our lock)."""
    while True:
        handle = open(lock_file, "a")  # noqa: SIM115 (closed on release by the caller)
        fcntl.flock(handle, fcntl.LOCK_EX)
        held = os.fstat(handle.fileno())
        try:
            current = os.stat(lock_file)
        except FileNotFoundError:
            current = None
        if current is not None and (current.st_ino, current.st_dev) == (held.st_ino, held.st_dev):
            return handle
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
