"""Stop signals: SIGTERM/SIGINT ask the loop to write a mid-epoch checkpoint after the current
step and stop (:class:`~selfkd.errors.RunInterrupted`); a second signal stops at once.

Under DDP a signal may reach one rank only. The ranks learn whether one arrived anywhere in the
small all-reduce of the non-finite check (:meth:`~selfkd.engine.guard.NonFiniteGuard.agree`),
so every rank stops after the same step.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopSignals:
    """The stop request of one run, with the handlers that record it while the run trains."""

    def __init__(self) -> None:
        #: the first signal that arrived on this process (None: none)
        self.signum: int | None = None
        #: under DDP: did a signal arrive on any rank (as of the last check)?
        self.everywhere = False
        self._old_handlers: dict[int, Any] = {}

    def install(self) -> None:
        """Record SIGTERM/SIGINT instead of dying (main thread only: signals arrive there)."""
        self._old_handlers = {}
        if threading.current_thread() is not threading.main_thread():
            return

        def ask_to_stop(signum: int, frame: Any) -> None:
            if self.signum is not None:  # a second signal: stop at once
                raise KeyboardInterrupt
            self.signum = signum

        for signum in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[signum] = signal.signal(signum, ask_to_stop)

    def uninstall(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers = {}

    def asked(self, distributed: bool) -> bool:
        """Should the loop stop now? Under DDP the decision every rank shares."""
        return self.everywhere if distributed else self.signum is not None

    @property
    def name(self) -> str:
        """The signal's name (SIGTERM when it arrived on another rank)."""
        return signal.Signals(self.number).name

    @property
    def number(self) -> int:
        """The signal's number (SIGTERM when it arrived on another rank)."""
        return self.signum if self.signum is not None else signal.SIGTERM
