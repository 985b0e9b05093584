"""ZF-LS loss (Zipf's label smoothing, Liang et al., ECCV 2022; megvii-research/zipfls @108e27a).

Targets from dense votes (no gradient): the final classifier ``W`` (weight K×C, bias K) is
applied to every spatial vector of the last feature map F (B×C×h×w, optionally bilinearly
upsampled ×2), and each position votes for its argmax class. Per sample:

    s_k = #positions voting k
    r_k = 1 + #{j : s_j > s_k}          (min-rank: ties share the smallest rank)
    w_k = r_k^(−power)                  (power 1: Zipf's law)
    π_k = w_k / Σ_{j≠y} w_j  for k ≠ y,  π_y = 0

Loss, with ``q`` the softmax over the K−1 non-target logits only (no temperature)::

    L_zipf = mean_b Σ_{k≠y} π_k · (log π_k − log q_k)
    L      = CE(z, y) + λ · L_zipf,      λ 0.1 (CIFAR-100, ImageNet), 1.0 (Tiny-ImageNet)

Ranks are computed on the device (sort + searchsorted, no CPU synchronisation); the official
PyTorch code ranks on the CPU with scipy's ``rankdata(method='min')``, which gives the same ranks.
If every position votes for y, all non-target classes tie and π is uniform over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "UPSAMPLE_MODES",
    "dense_votes",
    "min_ranks",
    "vote_counts",
    "zfls_loss",
    "zipf_kl",
    "zipf_targets",
]

UPSAMPLE_MODES = ("bilinear", "none")


@torch.no_grad()
def dense_votes(
    features: Tensor, weight: Tensor, bias: Tensor | None = None, upsample: str = "bilinear"
) -> Tensor:
    """Per-position argmax class of the classifier applied to a B×C×h×w map: B×P int64.

    ``upsample='bilinear'`` first resizes the map ×2 (``align_corners=False``), so P = 4·h·w;
    ``'none'`` keeps P = h·w. Computed in float32 without gradient.
    """
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {', '.join(UPSAMPLE_MODES)}, got {upsample!r}")
    if features.dim() != 4:
        raise ValueError(f"features must be B×C×h×w, got shape {tuple(features.shape)}")
    if weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"classifier weight {tuple(weight.shape)} does not fit features with "
            f"{features.shape[1]} channels"
        )
    x = features.detach().float()
    if upsample == "bilinear":
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    dense = torch.einsum("bchw,kc->bhwk", x, weight.detach().float())
    if bias is not None:
        dense = dense + bias.detach().float()
    return dense.argmax(dim=-1).flatten(1)


def vote_counts(votes: Tensor, num_classes: int) -> Tensor:
    """Votes per class: B×K float32 counts from B×P class indices (a scatter_add)."""
    counts = torch.zeros(votes.shape[0], num_classes, device=votes.device, dtype=torch.float32)
    return counts.scatter_add_(1, votes.long(), torch.ones_like(votes, dtype=torch.float32))


def min_ranks(scores: Tensor) -> Tensor:
    """Descending min-ranks per row: ``r_k = 1 + #{j : s_j > s_k}`` (float32, B×K).

    Equal scores share the smallest rank (scipy ``rankdata(-s, method='min')``). Runs on the
    scores' device in O(K log K) per row.
    """
    s = scores.detach().float().contiguous()
    ascending = s.sort(dim=1).values.contiguous()
    not_greater = torch.searchsorted(ascending, s, right=True)  # #{j : s_j <= s_k}
    return (s.shape[1] - not_greater + 1).float()


def zipf_targets(counts: Tensor, targets: Tensor, power: float = 1.0) -> Tensor:
    """π: ``w_k = r_k^(−power)`` over the non-target classes, renormalized; π_y = 0 (B×K)."""
    if counts.shape[1] < 2:
        raise ValueError("ZF-LS needs at least 2 classes")
    w = min_ranks(counts).pow(-power)
    w = w.scatter(1, targets.long()[:, None], 0.0)
    return w / w.sum(dim=1, keepdim=True)


def zipf_kl(logits: Tensor, targets: Tensor, pi: Tensor) -> Tensor:
    """``mean_b Σ_{k≠y} π_k (log π_k − log softmax_{k≠y}(z)_k)``; π is detached."""
    if logits.shape != pi.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets π {tuple(pi.shape)} differ in shape"
        )
    pi = pi.detach().float()
    target_mask = torch.zeros_like(pi, dtype=torch.bool).scatter_(1, targets.long()[:, None], True)
    log_q = F.log_softmax(logits.float().masked_fill(target_mask, float("-inf")), dim=1)
    keep = (pi > 0) & ~target_mask
    pointwise = torch.where(keep, pi * (pi.clamp_min(1e-38).log() - log_q), torch.zeros_like(pi))
    return pointwise.sum(dim=1).mean()


def zfls_loss(
    logits: Tensor,
    targets: Tensor,
    counts: Tensor,
    *,
    lam: float = 0.1,
    power: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``CE(z, y) + λ·L_zipf`` from per-class vote counts (B×K); terms ``ce`` and ``zipf``."""
    pi = zipf_targets(counts, targets, power)
    ce = F.cross_entropy(logits.float(), targets)
    zipf = zipf_kl(logits, targets, pi)
    loss = ce + lam * zipf
    return loss, {"ce": ce.detach(), "zipf": zipf.detach()}
