"""BYOT loss (Zhang et al., "Be Your Own Teacher: Improve the Performance of Convolutional Neural
Networks via Self Distillation", ICCV 2019).

With ``C`` the deepest classifier (the model's own output) and ``i`` the shallow exits::

    L = (1−α)·[CE(z_C, y) + Σ_i CE(z_i, y)]
        + α·Σ_i T²·KL(sg(p_C(T)) ‖ p_i(T))
        + λ·Σ_i mean_b ‖f_i − sg(f_C)‖²

where ``f`` are pooled feature vectors of the same width (the exit heads map to the deepest
width) and ``‖·‖²`` is the squared L2 norm of one sample's difference, averaged over the batch.
All terms are computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from selfkd.losses.core import tempered_kl

__all__ = ["byot_loss", "feature_hint_loss"]


def feature_hint_loss(features: Tensor, target_features: Tensor) -> Tensor:
    """``mean_b ‖f_b − sg(g_b)‖²``: squared L2 distance per sample, averaged over the batch.

    Inputs of more than two dimensions are flattened per sample; the target is detached.
    """
    f = features.float().flatten(1)
    g = target_features.detach().float().flatten(1)
    if f.shape != g.shape:
        raise ValueError(
            f"feature shapes differ: {tuple(features.shape)} vs {tuple(target_features.shape)}"
        )
    return (f - g).pow(2).sum(dim=1).mean()


def byot_loss(
    deep_logits: Tensor,
    exit_logits: Sequence[Tensor],
    targets: Tensor,
    deep_features: Tensor | None = None,
    exit_features: Sequence[Tensor] | None = None,
    *,
    alpha: float = 0.3,
    temperature: float = 3.0,
    feature_weight: float = 0.03,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The BYOT objective (module docstring); returns ``(loss, terms)``.

    ``terms`` are unweighted and detached: ``ce_deep`` = CE(z_C, y), ``ce_exits`` = Σ_i CE(z_i, y),
    ``kd_exits`` = Σ_i T²·KL(sg(p_C(T)) ‖ p_i(T)) and ``feature`` = Σ_i mean_b ‖f_i − sg(f_C)‖²
    (absent, and the features not needed, when ``feature_weight`` is 0).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if feature_weight < 0:
        raise ValueError(f"feature_weight must be >= 0, got {feature_weight}")
    ce_deep = F.cross_entropy(deep_logits.float(), targets)
    ce_exits = deep_logits.new_zeros((), dtype=ce_deep.dtype)
    kd_exits = deep_logits.new_zeros((), dtype=ce_deep.dtype)
    for logits in exit_logits:
        ce_exits = ce_exits + F.cross_entropy(logits.float(), targets)
        kd_exits = kd_exits + tempered_kl(deep_logits, logits, temperature)
    total = (1.0 - alpha) * (ce_deep + ce_exits) + alpha * kd_exits
    terms = {
        "ce_deep": ce_deep.detach(),
        "ce_exits": ce_exits.detach(),
        "kd_exits": kd_exits.detach(),
    }
    if feature_weight > 0:
        if deep_features is None or exit_features is None:
            raise ValueError("feature_weight > 0 needs deep_features and exit_features")
        if len(exit_features) != len(exit_logits):
            raise ValueError(
                f"{len(exit_logits)} exit logits but {len(exit_features)} exit features"
            )
        feature = deep_logits.new_zeros((), dtype=ce_deep.dtype)
        for f in exit_features:
            feature = feature + feature_hint_loss(f, deep_features)
        total = total + feature_weight * feature
        terms["feature"] = feature.detach()
    return total, terms
