"""Label smoothing: cross-entropy against smoothed one-hot targets.

Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016, §7
("label-smoothing regularization"). TF-KD (Yuan et al., CVPR 2020) compares with it as the
regularizer that self-KD implicitly performs. Formula
(:func:`selfkd.losses.smoothing.label_smoothing_loss`)::

    t = (1−ε)·onehot(y) + ε·u,   L = mean_b Σ_k −t_k·log softmax(z)_k

Defaults (``LabelSmoothingParams``): ε = 0.1 (Szegedy et al.; also TF-KD's LS baseline).

Decisions:

- ``spread``: where the smoothing mass ε goes. ``all`` (default, the paper's convention and
  ``torch.nn.CrossEntropyLoss(label_smoothing=ε)``'s): uniform over all K classes, so the label
  keeps 1−ε+ε/K. ``others``: ε/(K−1) on each non-target class, the label keeps exactly 1−ε
  (TF-KD's code, yuanli2333/Teacher-free-Knowledge-Distillation @d000ab3, ``loss_label_smoothing``).
- Terms logged: ``ls`` (the smoothed CE, the loss) and ``ce`` (the plain hard-label CE, for
  comparison with other methods; not trained on).
- ``data.mix`` mixup/cutmix (``mixing = "full"``: the whole batch is mixed): both labels of a
  mixed row are smoothed, t = λ·s(y) + (1−λ)·s(y[π])
  (:func:`selfkd.losses.mixing.mixed_targets`); ``mix_ce`` logs the hard-label mixed CE (not
  trained on). PS-KD §1 notes LS and CutMix together degrade accuracy and calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfkd.errors import ConfigError
from selfkd.losses.core import soft_target_ce
from selfkd.losses.mixing import mixed_ce, mixed_targets
from selfkd.losses.smoothing import SPREADS, label_smoothing_loss
from selfkd.methods.base import (
    METHODS,
    Batch,
    Method,
    MethodContext,
    StepInfo,
    StepOutput,
    check_number,
)

__all__ = ["LabelSmoothing", "LabelSmoothingParams"]


@dataclass
class LabelSmoothingParams:
    """Hyper-parameters of label smoothing (see the module docstring)."""

    epsilon: float = 0.1
    spread: str = "all"

    def validate(self) -> None:
        check_number("epsilon", self.epsilon, "unit")
        if self.spread not in SPREADS:
            raise ConfigError(
                f"method.spread must be one of {', '.join(SPREADS)}, got {self.spread!r}"
            )


@METHODS.register("label_smoothing", "ls", "label-smoothing")
class LabelSmoothing(Method):
    """Label smoothing (Szegedy et al. 2016): CE against (1−ε)·onehot + ε·uniform targets."""

    name = "label_smoothing"
    Params = LabelSmoothingParams
    mixing = "full"

    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        if self.params.spread == "others" and ctx.num_classes < 2:
            raise ConfigError(
                "method label_smoothing with spread: others needs at least 2 classes, the data "
                f"has {ctx.num_classes}; use spread: all"
            )

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        p: LabelSmoothingParams = self.params
        logits = model(batch.inputs)
        terms: dict[str, torch.Tensor] = {}
        if batch.mix is None:
            loss = label_smoothing_loss(logits, batch.targets, p.epsilon, p.spread)
        else:
            t = mixed_targets(batch.targets, batch.mix, logits.shape[1], p.epsilon, p.spread)
            loss = soft_target_ce(logits, t.to(logits.device))
            with torch.no_grad():
                terms["mix_ce"] = mixed_ce(logits, batch.targets, batch.mix, rows_only=False)
        with torch.no_grad():
            ce = F.cross_entropy(logits.float(), batch.targets)
        terms = {"ls": loss.detach(), "ce": ce, **terms}
        return StepOutput(loss=loss, logits=logits, targets=batch.targets, terms=terms)
