"""Plain cross-entropy: the baseline every method is compared with."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from selfkd.methods.base import METHODS, Batch, Method, StepInfo, StepOutput


@METHODS.register("ce", "baseline")
class CrossEntropy(Method):
    """Cross-entropy on hard labels: L = -log softmax(z)_y (the baseline of every paper)."""

    name = "ce"

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        logits = model(batch.inputs)
        loss = F.cross_entropy(logits, batch.targets)
        return StepOutput(loss=loss, logits=logits, targets=batch.targets, terms={"ce": loss})
