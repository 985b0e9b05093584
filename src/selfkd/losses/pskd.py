"""PS-KD loss (Kim et al., "Self-Knowledge Distillation with Progressive Refinement of Targets",
ICCV 2021; code lgcnsai/PS-KD-Pytorch @9aa0828), usable without the training engine.

The target of sample i at epoch t mixes its hard label with the model's own prediction of the
previous epoch::

    t_i = (1−α_t)·onehot(y_i) + α_t·p_{t−1}(x_i),     α_t = α_T·(t+1)/E   (t from 0)
    L   = mean_b Σ_k −t_{b,k}·log softmax(z_b)_k       (soft-target CE at τ = 1, paper eq. (3))

No other term is added (the official ``--PSKD`` loss is this soft-target CE alone).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from selfkd.losses.core import soft_target_ce

__all__ = ["pskd_alpha", "pskd_loss", "pskd_targets"]


def pskd_alpha(epoch: int, epochs: int, alpha_T: float = 0.8) -> float:
    """α_t = α_T·(epoch+1)/E for a 0-based ``epoch`` (official schedule), clamped at ≥ 0.

    Constant within an epoch; 0.8/E in epoch 0 and exactly α_T in the last epoch (E−1).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return max(0.0, alpha_T * (epoch + 1) / epochs)


def pskd_targets(targets: Tensor, prev_probs: Tensor, alpha_t: float) -> Tensor:
    """``(1−α_t)·onehot(y) + α_t·p_{t−1}`` (B×K, float32, detached)."""
    if not 0.0 <= alpha_t <= 1.0:
        raise ValueError(f"PS-KD alpha_t must be in [0, 1], got {alpha_t}")
    if prev_probs.dim() != 2 or prev_probs.shape[0] != targets.reshape(-1).shape[0]:
        raise ValueError(
            f"prev_probs must be B×K with one row per target, got {tuple(prev_probs.shape)} for "
            f"{targets.numel()} targets"
        )
    onehot = F.one_hot(targets.long().reshape(-1), prev_probs.shape[1]).float()
    onehot = onehot.to(prev_probs.device)
    return (1.0 - alpha_t) * onehot + alpha_t * prev_probs.detach().float()


def pskd_loss(logits: Tensor, targets: Tensor, prev_probs: Tensor, alpha_t: float) -> Tensor:
    """PS-KD loss: soft-target CE against ``(1−α_t)·onehot(y) + α_t·p_{t−1}``.

    ``prev_probs`` (B×K) are the previous-epoch probabilities of the batch's samples (detached
    here); with one-hot ``prev_probs`` or ``alpha_t = 0`` the loss is the hard-label CE.
    """
    if logits.shape != prev_probs.shape:
        raise ValueError(
            f"logits and prev_probs differ in shape: {tuple(logits.shape)} vs "
            f"{tuple(prev_probs.shape)}"
        )
    return soft_target_ce(logits, pskd_targets(targets, prev_probs, alpha_t).to(logits.device))
