"""Finding non-finite losses without a host round-trip in every step.

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

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NonFinite", "NonFiniteWatch", "step_values"]


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
