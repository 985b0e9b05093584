"""The previous epoch's model, frozen: PS-KD's p_{t−1} for token-level tasks (paper §4.4)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from selfkd.losses.core import freeze


class PreviousEpochModel:
    """A frozen copy of a model taken at the start of each epoch (= the end of the previous one).

    :meth:`start_epoch` (call it before the first step of every epoch) copies the model from
    epoch 1 on; in epoch 0 there is no previous model and :meth:`probs` returns None (PS-KD's
    epoch-0 targets are the one-hot labels). The copy is in eval mode (no dropout) with
    ``requires_grad=False``; its predictions are computed under ``torch.no_grad``.
    """

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.epoch: int | None = None

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        """Snapshot ``model`` for epoch ``epoch`` (no copy in epoch 0, one copy per epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch == self.epoch:
            return
        self.epoch = epoch
        if epoch == 0:
            self.model = None
            return
        self.model = freeze(copy.deepcopy(model))

    @torch.no_grad()
    def probs(self, **inputs: Any) -> Tensor | None:
        """Softmax of the snapshot's logits for ``inputs`` (float32), or None in epoch 0."""
        if self.model is None:
            return None
        out = self.model(**inputs)
        logits = out.logits if hasattr(out, "logits") else out
        return torch.softmax(logits.float(), dim=-1)
