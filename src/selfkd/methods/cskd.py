"""CS-KD: class-wise self-knowledge distillation.

Yun, Park, Lee, Shin, "Regularizing Class-wise Predictions via Self-knowledge Distillation",
CVPR 2020; official code alinlab/cs-kd @b447f25 (SPEC §3, research/official-code-notes.md §2).

Each batch holds B anchors and, for each anchor, one random training sample of the same class
(:class:`~selfkd.data.samplers.ClassPairSampler`; may be the anchor itself), 2·B images::

    L = CE(z_a, y) + λ · T² · KL(p_pair(T) ‖ p_anchor(T)),    p(T) = softmax(z/T)

KL batchmean over the anchors; the partner logits are the detached teacher; no CE on the
partners. Defaults (``CSKDParams``): T = 4, λ = 1 (official CIFAR/Tiny-ImageNet setting). The
official README uses **λ = 3 for the fine-grained sets** (CUB-200-2011, Stanford Dogs, MIT67,
FGVC-Aircraft, batch 32): set ``method.lam: 3`` there.

Decisions:

- Step: the anchors (first half of the batch) are forwarded with gradient, then the partners
  (second half) under ``no_grad`` **in train mode**, as the official code does: BatchNorm uses
  the partner half's own statistics and updates its running statistics a second time.
- ``StepOutput.logits/targets`` are the anchors only (training metrics count each anchor once;
  the partners are extra draws).
- The sampler keeps the short last batch (official behaviour); it ignores ``data.drop_last``.
- A class with a single training sample (its partner would always be itself) raises a
  :class:`~selfkd.errors.ConfigError` naming the class (see :mod:`selfkd.data.samplers`).
- Batches not built by the class-pair sampler (odd size, or halves of different classes) raise
  :class:`~selfkd.errors.TrainingError`: CS-KD needs its own sampler.
- No state beyond the model: nothing to save.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfkd.errors import TrainingError
from selfkd.losses.cskd import cskd_loss
from selfkd.methods.base import METHODS, Batch, Method, StepInfo, StepOutput, check_number

__all__ = ["CSKD", "CSKDParams"]


@dataclass
class CSKDParams:
    """Hyper-parameters of CS-KD (official defaults; λ = 3 for fine-grained sets)."""

    tau: float = 4.0
    lam: float = 1.0

    def validate(self) -> None:
        check_number("tau", self.tau, "positive", "cskd")
        check_number("lam", self.lam, "nonnegative", "cskd")


@METHODS.register("cskd", "cs-kd")
class CSKD(Method):
    """CS-KD: distil same-class partners' predictions into anchors, T²·KL at T=4 (CVPR 2020)."""

    name = "cskd"
    Params = CSKDParams

    def batch_sampler(
        self, labels: Tensor, batch_size: int, seed: int
    ) -> Callable[[int], list[Tensor]] | None:
        # imported here: loading the methods loads no dataset reader (selfkd.data's package)
        from selfkd.data.samplers import ClassPairSampler

        return ClassPairSampler(labels, batch_size, seed)

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        p: CSKDParams = self.params
        n = batch.inputs.shape[0]
        half = n // 2
        if n % 2 or half == 0:
            raise TrainingError(
                f"cskd got a batch of {n} images, but needs B anchors followed by B same-class "
                "partners; train it with its class-pair sampler (Method.batch_sampler)"
            )
        targets, pair_targets = batch.targets[:half], batch.targets[half:]
        if not torch.equal(targets, pair_targets):
            raise TrainingError(
                "cskd: the second half of the batch is not made of same-class partners of the "
                "first half; train it with its class-pair sampler (Method.batch_sampler)"
            )
        anchor_logits = model(batch.inputs[:half])
        with torch.no_grad():  # train mode, as the official code: BN uses the pair statistics
            pair_logits = model(batch.inputs[half:])
        loss, terms = cskd_loss(anchor_logits, pair_logits, targets, tau=p.tau, lam=p.lam)
        return StepOutput(
            loss=loss,
            logits=anchor_logits,
            targets=targets,
            terms={**terms, "loss": loss.detach()},
        )
