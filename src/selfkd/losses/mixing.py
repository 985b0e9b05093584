"""Losses for mixed batches (Mixup, CutMix; :mod:`selfkd.data.mixing`), usable without the engine.

A mixed row i shows its own image weighted λ and its partner π(i) weighted 1−λ; its label is
mixed the same way (Zhang et al. ICLR 2018 eq. (1); Yun et al. ICCV 2019 eq. (1))::

    L_mix = mean_{i mixed} [ λ_i·CE(z_i, y_i) + (1−λ_i)·CE(z_i, y_{π(i)}) ]

Under the split rule of self-KD methods (PS-KD §4.1) the unmixed rows keep the method's own loss
and the two parts are weighted by their row counts, so every sample weighs the same as in an
unmixed batch::

    L = (n_unmixed·L_method + n_mixed·L_mix) / B

``mix`` is a :class:`selfkd.steps.MixInfo`: ``index`` (π, B), ``lam`` (0-dim or B) and
``rows`` (B, bool mask of mixed rows). All losses are computed in float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from selfkd.losses.smoothing import smoothed_targets

if TYPE_CHECKING:
    from selfkd.steps import MixInfo

__all__ = ["mixed_ce", "mixed_targets", "split_loss"]


def _row_lam(mix: MixInfo, b: int, device: torch.device) -> Tensor:
    """λ per row (B, float32): the mix's λ on mixed rows, 1 on the others."""
    lam = mix.lam.to(device=device, dtype=torch.float32).expand(b)
    return torch.where(mix.rows.to(device), lam, torch.ones_like(lam))


def mixed_ce(
    logits: Tensor, targets: Tensor, mix: MixInfo | None, rows_only: bool = True
) -> Tensor:
    """``λ·CE(z, y) + (1−λ)·CE(z, y[π])`` averaged over the mixed rows.

    ``rows_only=False`` averages over the whole batch instead, the unmixed rows contributing
    their plain CE (λ = 1). Without ``mix`` it is the plain CE; with no mixed row (and
    ``rows_only``) it is 0.
    """
    z = logits.float()
    if mix is None:
        return F.cross_entropy(z, targets)
    b = z.shape[0]
    lam = _row_lam(mix, b, z.device)
    own = F.cross_entropy(z, targets, reduction="none")
    other = F.cross_entropy(z, targets[mix.index], reduction="none")
    # where() instead of products: a (1−λ)=0 weight must not turn an infinite CE into NaN
    per = torch.where(lam < 1, lam * own + (1 - lam) * other, own)
    if not rows_only:
        return per.mean()
    rows = mix.rows.to(z.device)
    return torch.where(rows, per, torch.zeros_like(per)).sum() / rows.sum().clamp_min(1)


def mixed_targets(
    targets: Tensor,
    mix: MixInfo | None,
    num_classes: int,
    epsilon: float = 0.0,
    spread: str = "all",
) -> Tensor:
    """Mixed (optionally label-smoothed) target distributions, B×K float32.

    ``λ·s(y) + (1−λ)·s(y[π])`` on mixed rows and ``s(y)`` on the others, where ``s`` is label
    smoothing with ``epsilon``/``spread`` (:func:`selfkd.losses.smoothing.smoothed_targets`;
    ε = 0 gives one-hot). Smoothing both labels then mixing equals mixing then smoothing.
    """
    own = smoothed_targets(targets, num_classes, epsilon, spread)
    if mix is None:
        return own
    other = smoothed_targets(targets[mix.index], num_classes, epsilon, spread)
    lam = _row_lam(mix, own.shape[0], own.device)[:, None]
    return lam * own + (1 - lam) * other


def split_loss(method_loss: Tensor | None, mix_loss: Tensor, mix: MixInfo) -> Tensor:
    """``(n_unmixed·L_method + n_mixed·L_mix) / B``; ``method_loss`` None when no row is unmixed."""
    b = mix.rows.numel()
    n_mixed = mix.rows.sum().to(mix_loss.dtype)
    total = n_mixed * mix_loss
    if method_loss is not None:
        total = total + (b - n_mixed) * method_loss.float()
    return total / b
