"""CS-KD loss (class-wise self-knowledge distillation, Yun et al., CVPR 2020).

For B anchors x_i with labels y_i and, for each, a partner x'_i of the same class::

    L = CE(z_a, y) + λ · T² · KL(p_pair(T) ‖ p_anchor(T))

with ``p(T) = softmax(z/T)``, the KL summed over classes and averaged over the anchors
("batchmean"; the official code's ``KLDivLoss(reduction='sum') / B`` is the same), the partner
side detached (the teacher: the official code forwards it under ``no_grad``). No CE on the
partners. Defaults T = 4, λ = 1 (λ = 3 for the fine-grained sets with batch 32, official README).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from selfkd.losses.core import tempered_kl

__all__ = ["cskd_loss"]


def cskd_loss(
    anchor_logits: Tensor,
    pair_logits: Tensor,
    targets: Tensor,
    *,
    tau: float = 4.0,
    lam: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``CE(z_a, y) + λ·T²·KL(softmax(sg(z_p)/T) ‖ softmax(z_a/T))``, batch mean over anchors.

    Returns the total loss and its unweighted terms ``ce`` and ``cls_kd`` (the T²-scaled KL).
    """
    if anchor_logits.shape != pair_logits.shape:
        raise ValueError(
            f"cskd: anchor and pair logits differ in shape: {tuple(anchor_logits.shape)} vs "
            f"{tuple(pair_logits.shape)}"
        )
    ce = F.cross_entropy(anchor_logits.float(), targets)
    kd = tempered_kl(pair_logits, anchor_logits, tau)
    loss = ce + lam * kd
    return loss, {"ce": ce.detach(), "cls_kd": kd.detach()}
