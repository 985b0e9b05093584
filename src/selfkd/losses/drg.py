"""DRG and DSR losses (Wang, Han, Guo, "Lightweight Self-Knowledge Distillation with
Multi-source Information Fusion"; papers/drg-dsr.md, eqs. (8)-(13)).

Notation: ``z`` main-head logits (B×K), ``z'`` the auxiliary classifier's logits on the same
batch, ``p(τ) = softmax(z/τ)``, ``z̃`` the logits of a row sorted in ascending order, KL summed
over classes and averaged over the batch, ``sg`` = stop-gradient.

- DRG (Distillation with Reverse Guidance): ``L_HL = CE(z, y) + CE(z', y)`` (eq. (8)) and
  ``L_RG = τ²·KL(sg(p(z')(τ)) ‖ p(z)(τ))`` (eq. (9)): the shallow "poor" teacher (the AC)
  teaches the main head.
- DSR (Distillation with Shape-wise Regularization): ``L_SR = τ²·KL(p(sg(z̃_{t−1}))(τ) ‖
  p(z̃_t)(τ))`` (eq. (11)), where ``z̃_{t−1}`` are the sorted logits of the previous iteration,
  paired with the current batch row by row (unrelated samples: only the sorted profile matters).
- Combined: ``L = L_HL + α·L_RG + β·L_SR`` (eq. (13)); DRG alone drops the last term, DSR alone
  uses ``CE(z, y) + β·L_SR`` (eq. (12)).

All terms are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfkd.losses.core import tempered_kl

__all__ = ["drg_dsr_loss", "reverse_guidance_loss", "shape_regularization_loss"]


def reverse_guidance_loss(main_logits: Tensor, ac_logits: Tensor, tau: float) -> Tensor:
    """DRG's reverse-guidance term, eq. (9): ``τ²·KL(sg(softmax(z'/τ)) ‖ softmax(z/τ))``.

    The auxiliary classifier (``ac_logits``, detached here) is the teacher and the main head
    (``main_logits``) the student. Batch mean.
    """
    return tempered_kl(ac_logits, main_logits, tau)


def shape_regularization_loss(logits: Tensor, prev_logits: Tensor, tau: float) -> Tensor:
    """DSR's shape-wise regularization, eq. (11).

    ``τ²·mean_i KL(softmax(sg(z̃_{t−1,i})/τ) ‖ softmax(z̃_{t,i}/τ))`` where ``z̃`` sorts each row
    of logits in ascending order (the gradient flows through the sorted values of ``logits``)
    and ``prev_logits`` (the previous iteration's logits, sorted or not: they are sorted again,
    detached) are paired with ``logits`` by row position. When the batch sizes differ both are
    trimmed to the first ``min(B_t, B_{t−1})`` rows.
    """
    if logits.dim() != 2 or prev_logits.dim() != 2:
        raise ValueError(
            f"DSR expects B×K logits, got {tuple(logits.shape)} and {tuple(prev_logits.shape)}"
        )
    if logits.shape[1] != prev_logits.shape[1]:
        raise ValueError(
            f"DSR: current and previous logits have different class counts "
            f"({logits.shape[1]} vs {prev_logits.shape[1]})"
        )
    n = min(logits.shape[0], prev_logits.shape[0])
    if n == 0:
        raise ValueError("DSR needs at least one row of current and previous logits")
    current = torch.sort(logits[:n].float(), dim=1).values
    previous = torch.sort(prev_logits[:n].detach().float(), dim=1).values
    return tempered_kl(previous, current, tau)


def drg_dsr_loss(
    main_logits: Tensor,
    targets: Tensor,
    ac_logits: Tensor | None = None,
    prev_logits: Tensor | None = None,
    *,
    alpha: float = 0.2,
    beta: float = 1.0,
    tau_drg: float = 1.0,
    tau_dsr: float = 4.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DRG / DSR / DRG+DSR objective, eq. (13): ``L_HL + α·L_RG + β·L_SR``.

    - ``ac_logits`` None → no auxiliary classifier: ``L_HL = CE(z, y)`` and no ``L_RG`` (DSR).
    - ``prev_logits`` None → no ``L_SR`` (DRG, or the first step of an epoch).

    Returns ``(loss, terms)``; ``terms`` holds the unweighted, detached values ``ce`` (main head),
    ``ce_ac``, ``rg`` (when ``ac_logits`` is given) and ``sr`` (when ``prev_logits`` is given).
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got {alpha} and {beta}")
    ce = F.cross_entropy(main_logits.float(), targets)
    total = ce
    terms: dict[str, Tensor] = {"ce": ce.detach()}
    if ac_logits is not None:
        if ac_logits.shape != main_logits.shape:
            raise ValueError(
                f"auxiliary and main logits differ in shape: {tuple(ac_logits.shape)} vs "
                f"{tuple(main_logits.shape)}"
            )
        ce_ac = F.cross_entropy(ac_logits.float(), targets)
        rg = reverse_guidance_loss(main_logits, ac_logits, tau_drg)
        total = total + ce_ac + alpha * rg
        terms["ce_ac"] = ce_ac.detach()
        terms["rg"] = rg.detach()
    if prev_logits is not None:
        sr = shape_regularization_loss(main_logits, prev_logits, tau_dsr)
        total = total + beta * sr
        terms["sr"] = sr.detach()
    return total, terms
