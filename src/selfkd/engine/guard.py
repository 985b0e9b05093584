"""The non-finite policy (``run.nonfinite``), and finding non-finite losses without a host
round-trip in every step.

Reading ``bool(torch.isfinite(loss))`` after each step makes the host wait for the device: on a
GPU the next step cannot be queued while the current one runs. :class:`NonFiniteWatch` keeps the
check on the device instead: :meth:`~NonFiniteWatch.observe` records, with a few tiny kernels and
no transfer, the first step whose loss or any logged term is NaN or infinite, and the values of
that step. The trainer reads the record (one transfer) every ``run.check_every`` steps, at the
end of every epoch and before every checkpoint (``run.nonfinite: stop``), so a diverged run
still stops naming its first bad step, and no checkpoint ever holds the diverged weights.
``run.nonfinite: skip`` must decide before the optimizer step, so it reads the flag every step.

What neither mode sees is a step whose loss is finite but whose update blows the weights up (a
NaN or huge gradient): skipping later steps cannot repair such weights. The trainer therefore
stops at once when a step to skip finds the weights no longer finite, checks the weights before
writing any checkpoint, and treats NaN/Inf logits at evaluation as a training divergence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from selfkd.engine import distributed as D
from selfkd.engine.signals import StopSignals
from selfkd.errors import TrainingError

if TYPE_CHECKING:
    from selfkd.engine.runtime import Runtime
    from selfkd.engine.state import Progress

__all__ = ["NonFinite", "NonFiniteGuard", "NonFiniteWatch", "step_values"]


@dataclass(frozen=True)
class NonFinite:
    """The first non-finite step: its global step and the loss and terms it logged."""

    global_step: int
    values: dict[str, float]


def step_values(loss: Tensor, terms: Mapping[str, Tensor]) -> tuple[tuple[str, ...], Tensor]:
    """The names and a float32 vector of ``loss`` followed by every scalar term (on the device)."""
    names = ("loss", *(k for k in terms if k != "loss"))
    values = [loss.detach().float().reshape(())]
    values += [terms[k].detach().float().reshape(()) for k in names[1:]]
    return names, torch.stack(values)


class NonFiniteWatch:
    """Device-side record of the first step with a NaN/Inf loss or term (see the module doc)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._first = torch.full((), -1, dtype=torch.long, device=self.device)
        self._layout = torch.full((), -1, dtype=torch.long, device=self.device)
        self._layouts: list[tuple[str, ...]] = []  # the term names seen, in order of appearance
        self._values: dict[tuple[str, ...], Tensor] = {}

    def observe(self, loss: Tensor, terms: Mapping[str, Tensor], global_step: int) -> Tensor:
        """Record this step if it is the first non-finite one; returns the (device) bad flag."""
        names, values = step_values(loss, terms)
        if names not in self._values:
            self._layouts.append(names)
        bad = ~torch.isfinite(values).all()
        new = bad & (self._first < 0)
        self._first = torch.where(new, global_step, self._first)
        self._layout = torch.where(new, self._layouts.index(names), self._layout)
        old = self._values.get(names)
        # the first time a layout is seen its values are stored as they are: they are only ever
        # read when this layout's step was the first bad one, i.e. when ``new`` held then
        self._values[names] = values if old is None else torch.where(new, values, old)
        return bad

    def flag(self) -> Tensor:
        """A device bool: has any observed step been non-finite? (no transfer)"""
        return self._first >= 0

    def first(self) -> NonFinite | None:
        """The first non-finite step, or None (reads the record: one host round-trip)."""
        step = int(self._first)
        if step < 0:
            return None
        names = self._layouts[int(self._layout)]
        values = self._values[names].tolist()
        return NonFinite(step, dict(zip(names, values, strict=True)))


class NonFiniteGuard:
    """What a NaN/Inf loss, diverged weights or NaN logits do to a run (``run.nonfinite``).

    ``stop`` (the default) records the first bad step on the device (:class:`NonFiniteWatch`)
    and raises a TrainingError naming it at the next check; ``skip`` decides every step (one
    host read; under DDP one all-reduce, so every rank skips the same steps) and gives up after
    ``run.max_skipped_steps``. Under DDP each check also tells every rank whether a stop signal
    arrived anywhere (``stop.everywhere``).
    """

    def __init__(
        self,
        run_cfg: Any,
        runtime: Runtime,
        model: nn.Module,
        progress: Progress,
        steps_per_epoch: int,
        stop: StopSignals,
        last: Path,
        log: Callable[[str], None],
    ) -> None:
        self.mode = run_cfg.nonfinite
        self.max_skipped = run_cfg.max_skipped_steps
        self.model, self.device = model, runtime.device
        self.rank, self.world_size = runtime.rank, runtime.world_size
        self.amp = runtime.amp is not None  # the message then suggests turning run.amp off
        #: the run's progress: where a checkpoint or evaluation is, steps skipped so far
        self.progress = progress
        self.steps_per_epoch = steps_per_epoch
        self.stop = stop
        self.last = last  # the last good checkpoint (named in the error when it exists)
        self.log = log
        #: device-side record of the first non-finite step (run.nonfinite: stop)
        self.watch = NonFiniteWatch(self.device)

    def skip(self, loss: Tensor, terms: dict[str, Tensor], global_step: int) -> bool:
        """After the forward: should this step be skipped (then it counts in
        ``progress.skipped_steps``)? Never under ``stop``: recorded on the device instead, read
        at the next check."""
        if self.mode != "skip":
            self.watch.observe(loss, terms, global_step)
            return False
        names, values = step_values(loss, terms)
        bad_here = ~torch.isfinite(values).all()
        if not self.agree(bad_here):
            return False
        found = NonFinite(global_step, dict(zip(names, values.tolist(), strict=True)))
        where = self.describe(found, here=bool(bad_here))
        if not self.weights_finite():
            self.fail(
                f"{where}; the model's weights are no longer finite (an earlier step with a "
                "finite loss blew them up), so skipping steps cannot recover the run"
            )
        skipped = self.progress.skipped_steps
        if skipped >= self.max_skipped:
            self.fail(
                f"{where}; {skipped} steps skipped already "
                f"(run.max_skipped_steps={self.max_skipped})"
            )
        self.progress.skipped_steps += 1
        self.log(f"skipping step: {where}")
        return True

    def check(self) -> None:
        """A check point (every ``run.check_every`` steps, at the end of an epoch, before a
        checkpoint): stop on a recorded non-finite step; under DDP also agree on stopping."""
        if self.mode == "skip":
            return  # decided in every step
        if self.agree(self.watch.flag()):
            found = self.watch.first()
            self.fail(self.describe(found, here=found is not None))

    def agree(self, bad_here: Tensor) -> bool:
        """Is any rank's flag set? One host read; under DDP one all-reduce that also decides,
        for every rank alike, whether a stop signal arrived anywhere (``stop.everywhere``)."""
        if self.world_size == 1:
            return bool(bad_here)
        stop = torch.full((), float(self.stop.signum is not None), device=self.device)
        flags = D.all_reduce_max(torch.stack([bad_here.float(), stop])).tolist()
        self.stop.everywhere = flags[1] > 0
        return flags[0] > 0

    def describe(self, found: NonFinite | None, here: bool) -> str:
        if found is None or not here:
            return f"non-finite loss on another rank (found by rank {self.rank}'s check)"
        loss = found.values.get("loss", float("nan"))
        terms = ", ".join(f"{k}={v:.4g}" for k, v in found.values.items() if k != "loss")
        epoch, step = divmod(found.global_step, self.steps_per_epoch)
        return (
            f"non-finite loss {loss:.4g} at epoch {epoch + 1}, step {step + 1} "
            f"(global step {found.global_step}); terms: {terms}"
        )

    def weights_finite(self) -> bool:
        """Are all model parameters finite? (one host read; only asked after a bad step)"""
        checks = [torch.isfinite(p).all() for p in self.model.parameters()]
        return bool(torch.stack(checks).all()) if checks else True

    def before_saving(self, path: Path) -> None:
        """Refuse to write checkpoint ``path`` of weights that are no longer finite (a step
        with a finite loss can still blow them up)."""
        if self.weights_finite():
            return
        epoch, step_in_epoch = self.progress.epoch, self.progress.step_in_epoch
        when = (
            f"after epoch {epoch}"
            if step_in_epoch == 0
            else f"at epoch {epoch + 1}, step {step_in_epoch}"
        )
        self.fail(
            f"the model's weights are no longer finite {when} (a step whose loss was still "
            f"finite blew them up); {path.name} was not written"
        )

    def check_logits(self, logits: Tensor, split: str) -> None:
        """NaN/Inf logits at evaluation: the weights diverged on steps whose loss still looked
        finite (or overflowed under run.amp). A TrainingError, before any checkpoint of them."""
        if bool(torch.isfinite(logits).all()):
            return
        skip = (
            " (run.nonfinite=skip only skips steps whose loss is NaN/Inf; it cannot undo weights "
            "that blew up on steps with a finite loss)"
            if self.mode == "skip"
            else ""
        )
        self.fail(
            f"the {split} logits after epoch {self.progress.epoch} contain NaN or Inf: the model's "
            f"weights diverged{skip}"
        )

    def fail(self, where: str) -> None:
        """Raise the TrainingError of a diverged run, naming the last good checkpoint."""
        D.barrier()  # rank 0 may be writing last.pt
        last = self.last if self.last.exists() else None
        keep = f"; the last good checkpoint is {last}" if last else ""
        amp = ", turn run.amp off" if self.amp else ""
        raise TrainingError(
            f"{where}{keep}; training diverged: lower train.lr, set train.grad_clip{amp} and "
            "train again (--overwrite or another run.name)"
        )
