"""Plain cross-entropy: the baseline every method is compared with.

With ``data.mix`` mixup/cutmix (``mixing = "full"``: the whole batch is mixed) the loss is the
mixed CE λ·CE(z, y) + (1−λ)·CE(z, y[π]) (:func:`selfkd.losses.mixing.mixed_ce`), logged as
``mix_ce`` instead of ``ce``; rows left unmixed (``data.mix.split: true``) take the plain CE.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from selfkd.losses.mixing import mixed_ce
from selfkd.methods.base import METHODS, Batch, Method, StepInfo, StepOutput


@METHODS.register("ce", "baseline")
class CrossEntropy(Method):
    """Cross-entropy on hard labels: L = -log softmax(z)_y (the baseline of every paper)."""

    name = "ce"
    mixing = "full"

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        logits = model(batch.inputs)
        if batch.mix is not None:
            loss = mixed_ce(logits, batch.targets, batch.mix, rows_only=False)
            return StepOutput(
                loss=loss, logits=logits, targets=batch.targets, terms={"mix_ce": loss}
            )
        loss = F.cross_entropy(logits, batch.targets)
        return StepOutput(loss=loss, logits=logits, targets=batch.targets, terms={"ce": loss})
