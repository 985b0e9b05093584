"""PS-KD loss (Kim et al., "Self-Knowledge Distillation with Progressive Refinement of Targets",
ICCV 2021; code lgcnsai/PS-KD-Pytorch @9aa0828), usable without the training engine.

The target of sample i at epoch t mixes its hard label with the model's own prediction of the
previous epoch::

    t_i = (1−α_t)·onehot(y_i) + α_t·p_{t−1}(x_i),     α_t = α_T·(t+1)/E   (t from 0)
    L   = mean_b Σ_k −t_{b,k}·log softmax(z_b)_k       (soft-target CE at τ = 1, paper eq. (3))

No other term is added (the official ``--PSKD`` loss is this soft-target CE alone).

Token level (paper §4.4, machine translation): logits B×T×V, targets B×T, previous predictions
B×T×V and a padding mask B×T (True = real token). The loss is the soft-target CE above per
token, averaged over the real tokens only (padded positions get no loss and no gradient)::

    L = Σ_{b,t} m_{b,t} Σ_v −t_{b,t,v}·log softmax(z_{b,t})_v  /  Σ_{b,t} m_{b,t}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfkd.losses.core import soft_target_ce

__all__ = ["pskd_alpha", "pskd_loss", "pskd_targets", "pskd_token_loss", "token_mask"]

#: the label value Hugging Face / PyTorch use for positions without a target
IGNORE_INDEX = -100


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


def pskd_loss(
    logits: Tensor,
    targets: Tensor,
    prev_probs: Tensor,
    alpha_t: float,
    mask: Tensor | None = None,
) -> Tensor:
    """PS-KD loss: soft-target CE against ``(1−α_t)·onehot(y) + α_t·p_{t−1}``.

    ``prev_probs`` (B×K) are the previous-epoch probabilities of the batch's samples (detached
    here); with one-hot ``prev_probs`` or ``alpha_t = 0`` the loss is the hard-label CE.
    Token-level logits (B×T×V) go to :func:`pskd_token_loss` with ``mask``.
    """
    if logits.dim() == 3:
        return pskd_token_loss(logits, targets, prev_probs, alpha_t, mask)
    if mask is not None:
        raise ValueError("a padding mask applies only to token-level (B×T×V) logits")
    if logits.shape != prev_probs.shape:
        raise ValueError(
            f"logits and prev_probs differ in shape: {tuple(logits.shape)} vs "
            f"{tuple(prev_probs.shape)}"
        )
    return soft_target_ce(logits, pskd_targets(targets, prev_probs, alpha_t).to(logits.device))


def token_mask(targets: Tensor, mask: Tensor | None, logits: Tensor) -> Tensor:
    """The B×T boolean mask of real tokens: ``mask`` checked against ``logits`` (B×T×V), or
    ``targets != -100`` when ``mask`` is None; ValueError (one line) on a shape mismatch."""
    if logits.dim() != 3:
        raise ValueError(f"token-level logits must be B×T×V, got shape {tuple(logits.shape)}")
    bt = tuple(logits.shape[:2])
    if tuple(targets.shape) != bt:
        raise ValueError(
            f"targets must be B×T = {bt} to match logits {tuple(logits.shape)}, got "
            f"{tuple(targets.shape)}"
        )
    if mask is None:
        return targets != IGNORE_INDEX
    if tuple(mask.shape) != bt:
        raise ValueError(
            f"padding mask has shape {tuple(mask.shape)} but the logits {tuple(logits.shape)} "
            f"need B×T = {bt}; pass the target-side (decoder) mask, one entry per target token"
        )
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("padding mask must be boolean or 0/1 integers (1 = real token)")
        mask = mask.bool()
    return mask & (targets != IGNORE_INDEX)


def pskd_token_loss(
    logits: Tensor,
    targets: Tensor,
    prev_probs: Tensor,
    alpha_t: float,
    mask: Tensor | None = None,
) -> Tensor:
    """Token-level PS-KD (paper §4.4): per-token soft-target CE, mean over real tokens.

    ``logits`` B×T×V, ``targets`` B×T (padding may hold -100), ``prev_probs`` B×T×V (the
    previous-epoch model's probabilities for the same tokens, detached here), ``mask`` B×T
    (True/1 = real token; default ``targets != -100``). Padded positions contribute nothing,
    and receive zero gradient. A batch without real tokens gives 0 (with a gradient graph).
    """
    if prev_probs.shape != logits.shape:
        raise ValueError(
            f"logits and prev_probs differ in shape: {tuple(logits.shape)} vs "
            f"{tuple(prev_probs.shape)}"
        )
    if not 0.0 <= alpha_t <= 1.0:
        raise ValueError(f"PS-KD alpha_t must be in [0, 1], got {alpha_t}")
    keep = token_mask(targets, mask, logits).to(logits.device)
    z = logits[keep]  # N×V: only real tokens enter the graph
    if z.shape[0] == 0:
        return logits.sum() * 0.0
    y = targets.to(logits.device)[keep]
    prev = prev_probs.to(logits.device)[keep]
    return soft_target_ce(z, pskd_targets(y, prev, alpha_t))
