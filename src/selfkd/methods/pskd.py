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
  with that step's logits (one vectorized write; under DDP through the ``MethodContext.gather`` hook
  so all ranks hold the same rows).
- The stored log-probabilities are turned back into probabilities with a softmax (not ``exp``),
  so every target row sums to 1 exactly even with fp16 rounding of the stored values.
- **Epoch 0** uses the one-hot labels as p_{t−1} whatever the bank holds, exactly as the
  official code (it writes onehot(y) into the memory before computing epoch-0 targets). The
  epoch-0 loss is therefore the plain CE and the non-zero α_0 = α_T/E has no effect.
- The bank is a submodule: it is saved in every checkpoint and restored on resume (the
  official code saves ``prev_predictions`` too). α_t is recomputed from the epoch, not stored.
- ``bank_topk`` (default None = dense): keep only the k largest log-probabilities per row plus
  the remaining mass spread uniformly (:class:`~selfkd.banks.PredictionBank` ``storage="topk"``),
  for large class counts; exact when k = K.
- Terms logged: ``pskd`` (the loss) and ``alpha_t``.
- **With CutMix/Cutout/Mixup** (``data.mix``; paper §4.1, absent from the official code):
  ``mixing = "split"``, the paper's rule: the engine mixes a random half of the shuffled batch
  (``batch.mix.rows``) and leaves the other half untouched. Unmixed rows take the PS-KD loss
  exactly as above; mixed rows take the mixing CE on hard labels,
  λ·CE(z, y) + (1−λ)·CE(z, y[π]) (λ = 1 for Cutout rows), not PS-KD targets. The step loss is
  ``(n_unmixed·L_pskd + n_mixed·L_mix)/B`` (:func:`selfkd.losses.mixing.split_loss`), so every
  sample weighs as in an unmixed batch. **Bank writes**: only unmixed rows are written back; a
  mixed image's prediction is not a prediction of sample i (it shows two samples), so a mixed
  sample keeps its older row until a step in which it is unmixed (each epoch a sample is unmixed
  with probability ~1/2). Terms: ``pskd`` (over unmixed rows) and ``mix_ce`` (over mixed rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfkd.banks import BANK_DTYPES, Gather, PredictionBank, bank_storage, check_bank_topk
from selfkd.errors import ConfigError
from selfkd.losses.pskd import pskd_alpha, pskd_loss
from selfkd.methods.base import (
    METHODS,
    Batch,
    Method,
    MethodContext,
    StepInfo,
    StepOutput,
    check_number,
    split_step,
)

__all__ = ["PSKD", "PSKDParams"]


@dataclass
class PSKDParams:
    """Hyper-parameters of PS-KD (see the module docstring)."""

    alpha_T: float = 0.8
    bank_dtype: str = "float16"
    #: keep only the top-k log-probabilities per bank row (large class counts); None = dense
    bank_topk: int | None = None

    def validate(self) -> None:
        check_number("alpha_T", self.alpha_T, "unit")
        if self.bank_dtype not in BANK_DTYPES:
            raise ConfigError(
                f"method.bank_dtype must be one of {', '.join(BANK_DTYPES)}, "
                f"got {self.bank_dtype!r}"
            )
        check_bank_topk(self.bank_topk)


@METHODS.register("pskd", "ps-kd")
class PSKD(Method):
    """PS-KD (Kim et al. 2021): soft targets mixing the label with last epoch's predictions."""

    name = "pskd"
    Params = PSKDParams
    mixing = "split"

    bank: PredictionBank | None

    def __init__(self, params: PSKDParams | None = None) -> None:
        super().__init__(params)
        self.bank = None
        self.epochs: int | None = None
        #: DDP hook for the bank (``MethodContext.gather``); None in a single process
        self.gather: Gather | None = None

    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        if ctx.epochs < 1:
            raise ConfigError(f"method pskd needs train.epochs >= 1, got {ctx.epochs}")
        self.epochs = ctx.epochs
        self.gather = ctx.gather
        self.bank = PredictionBank(
            ctx.num_train,
            ctx.num_classes,
            ctx.train_labels,
            dtype=self.params.bank_dtype,
            **bank_storage("pskd", self.params.bank_topk, ctx.num_classes),
            device=ctx.device,  # on the training device: no host copy in a step
        )

    def alpha_at(self, epoch: int) -> float:
        """α_t of a 0-based epoch: α_T·(epoch+1)/E."""
        if self.epochs is None:
            raise RuntimeError("PSKD.setup(model, ctx) must be called first")
        return pskd_alpha(epoch, self.epochs, self.params.alpha_T)

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        if self.bank is None:
            raise RuntimeError("PSKD.setup(model, ctx) must be called before training_step")
        # under data.mix only the unmixed rows take PS-KD targets (paper §4.1)
        return split_step(model, batch, info, self._loss)

    def _loss(self, logits: Tensor, batch: Batch, info: StepInfo) -> tuple[Tensor | None, dict]:
        """The PS-KD loss on (the unmixed rows of) the batch; None without a row."""
        assert self.bank is not None
        alpha_t = self.alpha_at(info.epoch)
        targets = batch.targets
        if info.epoch == 0:  # official: epoch-0 memory rows are the one-hot labels
            prev = F.one_hot(targets.long(), logits.shape[1]).float()
        else:
            log_p = self.bank.lookup(batch.indices).to(logits.device, non_blocking=True)
            prev = torch.softmax(log_p, dim=1)
        loss = pskd_loss(logits, targets, prev, alpha_t) if logits.shape[0] else None
        terms = {"alpha_t": torch.full((), alpha_t, device=logits.device)}  # no host copy
        if loss is not None:
            terms["pskd"] = loss.detach()
        return loss, terms

    def after_optimizer_step(self, model: nn.Module, batch: Batch, out: StepOutput) -> None:
        # this step's (pre-update) training predictions become next epoch's p_{t-1};
        # mixed rows are not predictions of their sample and are not written
        if self.bank is not None:
            self.bank.update_unmixed(batch.indices, out.logits, batch.mix, gather=self.gather)
