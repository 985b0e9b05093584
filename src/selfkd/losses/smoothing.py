"""Label smoothing and Teacher-free KD (TF-KD) losses, usable without the training engine.

Notation: ``z`` student logits (B×K), ``y`` hard labels, ``p(τ) = softmax(z/τ)``, KL_bm = KL
divergence summed over classes and averaged over the batch ("batchmean"), CE = hard-label
cross-entropy (batch mean). All losses are computed in float32 whatever the input dtype.

- Label smoothing (Szegedy et al., CVPR 2016, §7): soft-target CE against
  ``(1−ε)·onehot(y) + ε·u`` with ``u`` uniform over all K classes (``spread="all"``, the paper's
  convention: the label keeps ``1−ε+ε/K``) or over the K−1 other classes (``spread="others"``,
  the convention of TF-KD's code: the label keeps exactly ``1−ε``).
- TF-KD (Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization",
  CVPR 2020; code yuanli2333/Teacher-free-Knowledge-Distillation @d000ab3):

  - self-training: ``L = (1−α)·CE(z, y) + w·T²·KL_bm(p_teacher(T) ‖ p(T))``;
  - virtual teacher ("reg"): ``L = (1−α)·CE(z, y) + w·KL_bm(q ‖ softmax(z))`` with
    ``q = softmax(u/T)``, ``u_y = a``, ``u_k = (1−a)/(K−1)`` for k ≠ y.

  The official code normalizes its KL with ``nn.KLDivLoss()``'s default ``'mean'`` reduction,
  i.e. divides by B·K instead of B, and multiplies by a per-config ``multiplier`` m. Its KD
  weight is therefore ``α·m/K`` in batchmean terms: :func:`tfkd_kd_weight` converts, and the
  functions here take the batchmean weight ``w`` (``kd_weight``) directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfkd.losses.core import soft_target_ce, tempered_kl

__all__ = [
    "SPREADS",
    "label_smoothing_loss",
    "smoothed_targets",
    "tfkd_kd_weight",
    "tfkd_reg_loss",
    "tfkd_self_loss",
    "virtual_teacher",
]

SPREADS = ("all", "others")


def smoothed_targets(
    targets: Tensor, num_classes: int, epsilon: float, spread: str = "all"
) -> Tensor:
    """Label-smoothed target distributions (B×K, float32, rows sum to 1).

    ``spread="all"``: ``(1−ε)·onehot(y) + ε/K`` on every class (Szegedy et al. 2016).
    ``spread="others"``: ``1−ε`` on the label and ``ε/(K−1)`` on each other class (TF-KD code).
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"label smoothing epsilon must be in [0, 1], got {epsilon}")
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {', '.join(SPREADS)}, got {spread!r}")
    if spread == "others" and num_classes < 2:
        raise ValueError("spread='others' needs at least 2 classes")
    targets = targets.long().reshape(-1)
    onehot = F.one_hot(targets, num_classes).float()
    if spread == "all":
        return (1.0 - epsilon) * onehot + epsilon / num_classes
    return (1.0 - epsilon) * onehot + (epsilon / (num_classes - 1)) * (1.0 - onehot)


def label_smoothing_loss(
    logits: Tensor, targets: Tensor, epsilon: float = 0.1, spread: str = "all"
) -> Tensor:
    """Label-smoothing cross-entropy: ``mean_b Σ_k −t_k·log softmax(z)_k``.

    ``t = smoothed_targets(y, K, ε, spread)`` (see :func:`smoothed_targets`). ε = 0 gives CE.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be B×K, got shape {tuple(logits.shape)}")
    target_probs = smoothed_targets(targets, logits.shape[1], epsilon, spread)
    return soft_target_ce(logits, target_probs.to(logits.device))


def tfkd_kd_weight(alpha: float, multiplier: float, num_classes: int) -> float:
    """The batchmean KD weight ``α·m/K`` equivalent to TF-KD's ``α·m·KLDivLoss('mean')``.

    ``KLDivLoss()`` with its default ``'mean'`` reduction averages over all B·K entries, so it
    equals KL_bm/K. Official CIFAR-100 ResNet-18: self α 0.95, m 50 → 0.475 (× T² = 36 gives the
    effective 17.1 on KL_bm); reg α 0.1, m 100 → 0.1.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return alpha * multiplier / num_classes


def _check_alpha(alpha: float, kd_weight: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if kd_weight < 0:
        raise ValueError(f"kd_weight must be >= 0, got {kd_weight}")


def tfkd_self_loss(
    student_logits: Tensor,
    targets: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float,
    temperature: float,
    kd_weight: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """TF-KD self-training loss (Yuan et al. 2020, ``loss_kd_self`` of the official code).

    ``L = (1−α)·CE(z, y) + w·T²·KL_bm(softmax(sg(z_teacher)/T) ‖ softmax(z/T))`` where the
    teacher is a trained model of the same architecture and ``w = kd_weight`` is the batchmean
    weight (official: ``w = α·m/K``, see :func:`tfkd_kd_weight`). Returns ``(L, terms)`` with the
    unweighted, detached ``terms["ce"]`` and ``terms["kd"] = T²·KL_bm`` (absent if w = 0).
    """
    _check_alpha(alpha, kd_weight)
    ce = F.cross_entropy(student_logits.float(), targets)
    total = (1.0 - alpha) * ce
    terms = {"ce": ce.detach()}
    if kd_weight > 0:
        kd = tempered_kl(teacher_logits, student_logits, temperature)
        total = total + kd_weight * kd
        terms["kd"] = kd.detach()
    return total, terms


def virtual_teacher(
    targets: Tensor, num_classes: int, correct_prob: float = 0.99, temperature: float = 20.0
) -> Tensor:
    """TF-KD's virtual teacher ``q = softmax(u/T)`` (B×K, float32), official behaviour.

    ``u_y = a`` (``correct_prob``) and ``u_k = (1−a)/(K−1)`` for k ≠ y. ``u`` is already a
    probability vector, but the official code (``loss_kd_regularization``) feeds it to softmax
    as if it were logits, so q is nearly uniform: for K = 100, T = 20, a = 0.99,
    ``q_y ≈ 0.01050`` and ``q_k ≈ 0.009995``. The result is a mild uniform label smoothing.
    """
    if num_classes < 2:
        raise ValueError("the TF-KD virtual teacher needs at least 2 classes")
    if not 0.0 <= correct_prob <= 1.0:
        raise ValueError(f"correct_prob must be in [0, 1], got {correct_prob}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return torch.softmax(
        _virtual_teacher_logits(targets, num_classes, correct_prob, temperature), 1
    )


def _virtual_teacher_logits(
    targets: Tensor, num_classes: int, correct_prob: float, temperature: float
) -> Tensor:
    """``u/T`` (B×K, float32): the logits whose softmax is the virtual teacher."""
    onehot = F.one_hot(targets.long().reshape(-1), num_classes).float()
    other = (1.0 - correct_prob) / (num_classes - 1)
    u = correct_prob * onehot + other * (1.0 - onehot)
    return u / temperature


def tfkd_reg_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    alpha: float,
    temperature: float,
    kd_weight: float,
    correct_prob: float = 0.99,
) -> tuple[Tensor, dict[str, Tensor]]:
    """TF-KD virtual-teacher loss (Tf-KD_reg, ``loss_kd_regularization`` of the official code).

    ``L = (1−α)·CE(z, y) + w·KL_bm(q ‖ softmax(z))`` with ``q`` = :func:`virtual_teacher`
    (``softmax(u/T)``, nearly uniform) and the student **not** softened (T = 1 on z), as in the
    official code. ``w = kd_weight`` is the batchmean weight (official ``α·m/K``; ResNet-18
    CIFAR-100: α 0.1, m 100, K 100 → 0.9·CE + 0.1·KL_bm). Returns ``(L, terms)`` with the
    unweighted, detached ``terms["ce"]`` and ``terms["kd"] = KL_bm(q ‖ softmax(z))`` (absent if
    w = 0).
    """
    _check_alpha(alpha, kd_weight)
    if logits.dim() != 2:
        raise ValueError(f"logits must be B×K, got shape {tuple(logits.shape)}")
    ce = F.cross_entropy(logits.float(), targets)
    total = (1.0 - alpha) * ce
    terms = {"ce": ce.detach()}
    if kd_weight > 0:
        if not 0.0 <= correct_prob <= 1.0:
            raise ValueError(f"correct_prob must be in [0, 1], got {correct_prob}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if logits.shape[1] < 2:
            raise ValueError("the TF-KD virtual teacher needs at least 2 classes")
        teacher = _virtual_teacher_logits(targets, logits.shape[1], correct_prob, temperature)
        # tempered_kl at τ = 1: KL_bm(softmax(u/T) ‖ softmax(z)), the student is not softened
        kd = tempered_kl(teacher.to(logits.device), logits, 1.0)
        total = total + kd_weight * kd
        terms["kd"] = kd.detach()
    return total, terms
