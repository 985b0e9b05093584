"""What a run shows while it trains: a progress bar (``run.progress``) or, without one, a line
every ``run.log_every`` steps, and one line per epoch. The host reads a step's loss only where
it reads something anyway (a check point) or where a line is asked for."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from torch import Tensor

#: the metrics an epoch line shows, when the row has them
EPOCH_LINE_KEYS = (
    "train_loss",
    "train_top1_err",
    "test_top1_err",
    "test_nll",
    "test_ece",
    "val_top1_err",
)


def wants_progress_bar(mode: str) -> bool:
    if mode == "bar":
        return True
    if mode == "off":
        return False
    return sys.stderr.isatty() and not os.environ.get("CI")


class StepDisplay:
    """One epoch's progress: a tqdm bar, or ``log_every`` lines when no bar shows."""

    def __init__(
        self,
        mode: str,
        log_every: int,
        log: Callable[[str], None],
        epochs: int,
        steps_per_epoch: int,
    ) -> None:
        self.mode, self.log_every, self.log = mode, log_every, log
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.bar: Any = None
        self.epoch = 0
        self.start = time.perf_counter()

    def open(self, epoch: int, first: int, start: float) -> None:
        """Start epoch ``epoch`` at step ``first`` (its clock started at ``start``)."""
        self.epoch, self.start, self.bar = epoch, start, None
        if wants_progress_bar(self.mode):
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.steps_per_epoch,
                desc=f"epoch {epoch + 1}/{self.epochs}",
                leave=False,
                dynamic_ncols=True,
            )
            self.bar.update(first)

    def step(self, step: int, loss: Tensor, lr: float, checked: bool) -> None:
        """After a trained (not skipped) step."""
        if self.bar is not None:
            self.bar.update(1)
            if checked:  # the host reads the loss only where it checks anyway
                self.bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.4g}")
        elif self.log_every and (step + 1) % self.log_every == 0:
            seconds = time.perf_counter() - self.start
            self.log(
                f"epoch {self.epoch + 1}/{self.epochs} step {step + 1}/{self.steps_per_epoch} "
                f"loss={loss.detach().item():.4f} lr={lr:.4g} ({seconds:.1f}s)"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def start_line(trainer: Any) -> str:
    """The first log line of a run (what it trains, on what) or of a resumed one (where)."""
    cfg, progress = trainer.cfg, trainer.progress
    if trainer.resume:
        where = f", step {progress.step_in_epoch + 1}" if progress.step_in_epoch else ""
        return (
            f"resuming {trainer.run.path} at epoch {progress.epoch + 1}/{cfg.train.epochs}{where}"
        )
    parameters = sum(p.numel() for p in trainer.model.parameters())
    data = trainer.data
    return (
        f"run {trainer.run.path}: method {trainer.method.name}, model {cfg.model.name} "
        f"({parameters:,} parameters), data {cfg.data.name} "
        f"({data.num_train} train images, {data.num_classes} classes), "
        f"device {trainer.device}, {cfg.train.epochs} epochs x {trainer.steps_per_epoch} steps"
    )


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """``epoch 3/10 lr=0.1 train_loss=... test_top1_err=... (12.3s)``."""
    parts = [f"{k}={row[k]:.4g}" for k in EPOCH_LINE_KEYS if isinstance(row.get(k), float)]
    return (
        f"epoch {row['epoch']}/{epochs} lr={row['lr']:.4g} "
        f"{' '.join(parts)} ({row['train_seconds']:.1f}s)"
    )
