"""User-facing errors.

Every problem a user can fix (a typo in a config, a missing dataset file, a checkpoint of the
wrong model) raises a subclass of :class:`SelfKDError` with a one-line message that says what
was wrong and how to fix it. The CLI prints ``error: <message>`` and exits with status 2; the
Python API lets the exception propagate.
"""

from __future__ import annotations


class SelfKDError(Exception):
    """Base class of every error a user can fix; the message is one line."""


class ConfigError(SelfKDError, ValueError):
    """A config key or value is unknown, malformed or inconsistent."""


class DataError(SelfKDError):
    """A dataset is missing, malformed or inconsistent with the config."""


class ModelError(SelfKDError):
    """A model cannot be built or lacks what a method needs (e.g. feature taps)."""


class CheckpointError(SelfKDError):
    """A checkpoint is missing, corrupt, unsafe or belongs to another model."""


class RunDirError(SelfKDError):
    """A run directory cannot be used (not writable, already holds a run, ...)."""


class TrainingError(SelfKDError):
    """Training had to stop (non-finite loss, critic divergence, ...)."""


class RunInterrupted(SelfKDError):
    """A signal (SIGTERM, SIGINT) stopped training after a checkpoint was written."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
