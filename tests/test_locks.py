"""selfkd.locks.exclusive_lock: exclusion, the removed lock file, and the waiter that was granted
a lock on a file already removed."""

from __future__ import annotations

import os
import threading
import time

import pytest

from selfkd import locks
from selfkd.locks import exclusive_lock

pytest.importorskip("fcntl")


def test_a_second_holder_waits_until_the_first_leaves(tmp_path):
    lock_file, events = tmp_path / "x.lock", []
    entered = threading.Event()

    def first():
        with exclusive_lock(lock_file):
            events.append("first in")
            entered.set()
            time.sleep(0.3)  # the second must not get in meanwhile
            events.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait()
    with exclusive_lock(lock_file):
        events.append("second in")
    thread.join()
    assert events == ["first in", "first out", "second in"]
    assert lock_file.exists()  # kept unless remove=True


@pytest.mark.parametrize("remove", [True, False])
def test_remove_deletes_the_lock_file_on_release_also_after_an_error(tmp_path, remove):
    lock_file = tmp_path / "x.lock"
    with pytest.raises(KeyError), exclusive_lock(lock_file, remove=remove):
        assert lock_file.exists()
        raise KeyError("inside")
    assert lock_file.exists() is not remove
    with exclusive_lock(lock_file, remove=remove):  # and it is free again
        pass


def test_a_lock_granted_on_a_removed_file_is_taken_again_on_the_current_one(tmp_path, monkeypatch):
    """Between our open and our lock, the holder removes the file (remove=True) and a newcomer
    creates a new one and holds it: our lock on the old file is worthless, so we must wait for
    the newcomer and end up holding the file the path names."""
    lock_file, events, opened = tmp_path / "x.lock", [], []
    newcomer_holds, real_open = threading.Event(), open

    def newcomer():
        with exclusive_lock(lock_file):
            events.append("newcomer in")
            newcomer_holds.set()
            time.sleep(0.3)
            events.append("newcomer out")

    def racing_open(path, mode):
        handle = real_open(path, mode)
        opened.append(os.fstat(handle.fileno()).st_ino)
        if len(opened) == 1:  # the holder removes the file we just opened; a newcomer arrives
            os.unlink(path)
            threading.Thread(target=newcomer, daemon=True).start()
            newcomer_holds.wait()
        return handle

    monkeypatch.setattr(locks, "open", racing_open, raising=False)
    with exclusive_lock(lock_file):
        events.append("we are in")
        held_now = opened[-1]
        assert os.stat(lock_file).st_ino == held_now  # we hold the file the path names
    assert events == ["newcomer in", "newcomer out", "we are in"]
    assert len(opened) >= 2
