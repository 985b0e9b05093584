"""PS-KD: progressive self-knowledge distillation with the model's previous-epoch predictions.

Kim, Ji, Yoon, Hwang, "Self-Knowledge Distillation with Progressive Refinement of Targets",
ICCV 2021 (papers/ps-kd.md); official code lgcnsai/PS-KD-Pytorch @9aa0828 (SPEC §2,
research/official-code-notes.md §1). Formula (:func:`selfkd.losses.pskd.pskd_loss`)::

    t_i = (1−α_t)·onehot(y_i) + α_t·p_{t−1}(x_i)
    L   = mean_b Σ_k −t_{b,k}·log softmax(z_b)_k           (soft-target CE at τ = 1)
    α_t = α_T·(epoch+1)/E                                   (epoch from 0, E = train.epochs)

No other term (the official ``--PSKD`` loss is this soft-target CE alone).

Defaults (``PSKDParams``): α_T = 0.8 (paper §4, official ``--alpha_T``); the bank in float16.

Decisions:

- **p_{t−1}** is what the official code stores: the softmax of the training forward that last
  saw the sample, one epoch earlier (augmented input, train-mode BN, weights *before* that
  step's update); no extra forward, no weight snapshot. It lives in a
  :class:`~selfkd.banks.PredictionBank` (N×K log-probabilities indexed by dataset index,
  ``bank_dtype`` float16 by default: CIFAR-100 takes 10 MB, ImageNet 2.6 GB instead of the
  official 5.1 GB fp32 CPU table). :meth:`PSKD.after_optimizer_step` overwrites the batch's rows
  with that step's logits (one vectorized write; under DDP through the :attr:`PSKD.gather` hook
  so all ranks hold the same rows).
- The stored log-probabilities are turned back into probabilities with a softmax (not ``exp``),
  so every target row sums to 1 exactly even with fp16 rounding of the stored values.
- **Epoch 0** uses the one-hot labels as p_{t−1} whatever the bank holds, exactly as the
  official code (it writes onehot(y) into the memory before computing epoch-0 targets). The
  epoch-0 loss is therefore the plain CE and the non-zero α_0 = α_T/E has no effect.
- The bank is a submodule: it is saved in every checkpoint and restored on resume (the
  official code saves ``prev_predictions`` too). α_t is recomputed from the epoch, not stored.
- Terms logged: ``pskd`` (the loss) and ``alpha_t``.
- Not implemented: the paper's PS-KD + CutMix/Cutout variant (absent from the official code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfkd.banks import BANK_DTYPES, Gather, PredictionBank
from selfkd.errors import ConfigError
from selfkd.losses.pskd import pskd_alpha, pskd_loss
from selfkd.methods.base import METHODS, Batch, Method, MethodContext, StepInfo, StepOutput

__all__ = ["PSKD", "PSKDParams"]


@dataclass
class PSKDParams:
    """Hyper-parameters of PS-KD (see the module docstring)."""

    alpha_T: float = 0.8
    bank_dtype: str = "float16"

    def validate(self) -> None:
        if not math.isfinite(self.alpha_T) or not 0.0 <= self.alpha_T <= 1.0:
            raise ConfigError(f"method.alpha_T must be in [0, 1], got {self.alpha_T}")
        if self.bank_dtype not in BANK_DTYPES:
            raise ConfigError(
                f"method.bank_dtype must be one of {', '.join(BANK_DTYPES)}, "
                f"got {self.bank_dtype!r}"
            )


@METHODS.register("pskd", "ps-kd")
class PSKD(Method):
    """PS-KD (Kim et al. 2021): soft targets mixing the label with last epoch's predictions."""

    name = "pskd"
    Params = PSKDParams

    bank: PredictionBank | None

    def __init__(self, params: PSKDParams | None = None) -> None:
        super().__init__(params)
        self.params.validate()
        self.bank = None
        self.epochs: int | None = None
        #: DDP hook for the bank: ``gather(indices, logits) -> (indices, logits)`` of all ranks
        self.gather: Gather | None = None

    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        if ctx.epochs < 1:
            raise ConfigError(f"method pskd needs train.epochs >= 1, got {ctx.epochs}")
        self.epochs = ctx.epochs
        self.bank = PredictionBank(
            ctx.num_train, ctx.num_classes, ctx.train_labels, dtype=self.params.bank_dtype
        ).to(ctx.device)

    def alpha_at(self, epoch: int) -> float:
        """α_t of a 0-based epoch: α_T·(epoch+1)/E."""
        if self.epochs is None:
            raise RuntimeError("PSKD.setup(model, ctx) must be called first")
        return pskd_alpha(epoch, self.epochs, self.params.alpha_T)

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        if self.bank is None:
            raise RuntimeError("PSKD.setup(model, ctx) must be called before training_step")
        logits = model(batch.inputs)
        alpha_t = self.alpha_at(info.epoch)
        if info.epoch == 0:  # official: epoch-0 memory rows are the one-hot labels
            prev = F.one_hot(batch.targets.long(), logits.shape[1]).float()
        else:
            log_p = self.bank.lookup(batch.indices).to(logits.device, non_blocking=True)
            prev = torch.softmax(log_p, dim=1)
        loss = pskd_loss(logits, batch.targets, prev, alpha_t)
        terms = {
            "pskd": loss.detach(),
            "alpha_t": torch.tensor(alpha_t, device=logits.device),
        }
        return StepOutput(loss=loss, logits=logits, targets=batch.targets, terms=terms)

    def after_optimizer_step(self, model: nn.Module, batch: Batch, out: StepOutput) -> None:
        # this step's (pre-update) training predictions become next epoch's p_{t-1}
        if self.bank is not None:
            self.bank.update(batch.indices, out.logits, gather=self.gather)
