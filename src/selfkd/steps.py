"""What flows through one training step: the batch, where the engine is, what a method returns.

A leaf module (it imports torch only), shared by the engine (:mod:`selfkd.engine.trainer`), the
mixing augmentations (:mod:`selfkd.data.mixing`), the losses (:mod:`selfkd.losses.mixing`) and
the methods (:mod:`selfkd.methods.base`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["Batch", "MixInfo", "StepInfo", "StepOutput"]


@dataclass
class MixInfo:
    """How a batch was mixed, for the loss.

    ``index`` (B, long): the partner of each row (identity on unmixed rows); ``lam``: the weight
    of a row's own label, a 0-dim tensor (one λ per batch) or one value per row; ``rows`` (B,
    bool): the rows that were mixed; ``unmixed`` (long, ascending): the other rows' positions,
    so methods can select them without a boolean mask (whose result size the host would have to
    read back from the device).
    """

    index: Tensor
    lam: Tensor
    rows: Tensor
    unmixed: Tensor | None = None

    def unmixed_rows(self) -> Tensor:
        """Positions of the unmixed rows, ascending (``(~rows).nonzero()`` when not given)."""
        if self.unmixed is None:
            self.unmixed = (~self.rows).nonzero().reshape(-1)
        return self.unmixed


@dataclass
class Batch:
    """One training batch on the device.

    ``inputs`` are augmented and normalized; ``raw`` are the images before the on-device
    augmentation (for methods that need a second view: ``augment(raw)`` draws a new one);
    ``indices`` are dataset indices (0..num_train-1) for per-sample memories. ``mix`` says how
    ``inputs`` were mixed by ``data.mix`` (:class:`MixInfo`: partners, λ, mixed rows;
    ``targets`` stay the rows' own labels), None when they were not.
    """

    inputs: Tensor
    targets: Tensor
    indices: Tensor
    raw: Tensor
    augment: Callable[[Tensor], Tensor]
    mix: MixInfo | None = None


@dataclass
class StepInfo:
    """Where the engine is: 0-based epoch, step inside the epoch and global step."""

    epoch: int
    step: int
    global_step: int
    epochs: int
    steps_per_epoch: int


@dataclass
class StepOutput:
    """What a training step returns.

    ``loss`` is back-propagated by the engine; ``logits``/``targets`` are the main head's
    predictions on the samples that count for training metrics; ``terms`` are named scalars
    (detached by the engine) that appear as columns in the metrics files.
    """

    loss: Tensor
    logits: Tensor
    targets: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
