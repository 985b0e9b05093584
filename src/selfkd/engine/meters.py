"""The training columns of an epoch's metrics row: running sums kept on the device (no host
read per step), added up over ranks at the end of the epoch, and carried through a mid-epoch
checkpoint as ``progress.partial``."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from selfkd.engine import distributed as D


class EpochMeter:
    """Sample-weighted sums of the loss and every logged term, and the training error."""

    def __init__(self, device: torch.device, partial: dict[str, Any] | None = None) -> None:
        partial = partial or {}
        self.device = device
        self.sums: dict[str, Tensor] = {
            k: torch.tensor(v, device=device) for k, v in partial.get("sums", {}).items()
        }
        self.seen = int(partial.get("seen", 0))
        self.wrong = torch.tensor(float(partial.get("wrong", 0)), device=device)
        self.start = time.perf_counter() - float(partial.get("seconds", 0.0))

    def add(self, out: Any, loss: Tensor) -> None:
        """Add one step's :class:`~selfkd.methods.StepOutput` (its ``loss`` as trained)."""
        n = out.targets.shape[0]
        self.seen += n
        with torch.no_grad():
            terms = {"loss": loss.detach(), **{k: v.detach().float() for k, v in out.terms.items()}}
            for key, value in terms.items():
                self.sums[key] = self.sums.get(key, torch.zeros((), device=self.device)) + value * n
            self.wrong += (out.logits.detach().argmax(1) != out.targets).sum()

    def seconds(self) -> float:
        """Training time of this epoch so far (including before a resume)."""
        return time.perf_counter() - self.start

    def reduce(self) -> None:
        """Add up every rank's sums (under DDP; keys missing on a rank count as 0)."""
        keys = sorted(set().union(*D.all_gather_object(sorted(self.sums))))
        zero = torch.zeros((), device=self.device)
        local = [self.sums.get(k, zero).float().reshape(()) for k in keys]
        flat = torch.stack(
            [*local, torch.tensor(float(self.seen), device=self.device), self.wrong.float()]
        )
        flat = D.all_reduce_sum(flat.double())
        self.sums = {k: flat[i] for i, k in enumerate(keys)}
        self.seen, self.wrong = round(float(flat[-2])), flat[-1]

    def partial(self) -> dict[str, Any]:
        """The sums so far, for a mid-epoch checkpoint (one host read)."""
        return {
            "sums": {k: float(v) for k, v in self.sums.items()},
            "seen": self.seen,
            "wrong": float(self.wrong),
            "seconds": self.seconds(),
        }

    def row(self) -> dict[str, float]:
        """``train_<term>`` means and ``train_top1_err`` (percent)."""
        row = {f"train_{key}": float(value) / max(1, self.seen) for key, value in self.sums.items()}
        row["train_top1_err"] = 100.0 * float(self.wrong) / max(1, self.seen)
        return row
