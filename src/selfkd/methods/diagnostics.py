"""AI-KD's diagnostics: how the student's outputs and the adversarial term L_A behave.

Logged per step when ``method.diagnostics`` is true (the default): device tensors, no host read,
no effect on the loss or its gradient (``selfkd plot --kind critic`` draws them per epoch).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["adversarial_gradient_stats", "output_stats"]

#: smallest denominator of the diagnostic ratios (keeps them finite for the non-finite watch)
_TINY = 1e-12


def output_stats(prefix: str, logits: Tensor) -> dict[str, Tensor]:
    """Per-batch means of a model's float32 logits: ``<prefix>_logit_norm`` (‖z‖₂),
    ``<prefix>_logit_cnorm`` (‖z − mean_k z‖₂, the part softmax sees) and ``<prefix>_max_prob``
    (max_k softmax(z)_k). Device tensors, no gradient."""
    with torch.no_grad():
        centred = logits - logits.mean(dim=1, keepdim=True)
        return {
            f"{prefix}_logit_norm": logits.norm(dim=1).mean(),
            f"{prefix}_logit_cnorm": centred.norm(dim=1).mean(),
            f"{prefix}_max_prob": logits.softmax(dim=1).amax(dim=1).mean(),
        }


def adversarial_gradient_stats(
    logits: Tensor, targets: Tensor, adversarial: Tensor, *, omega: float, alpha_ce: float
) -> dict[str, Tensor]:
    """How L_A pulls on the student's logits z (B×K, float32, part of L_A's graph).

    g_A = ∂L_A/∂z by ``torch.autograd.grad`` (one backward through the critic and the critic
    input only; the graph is kept for the engine's backward); g_CE = ∂CE/∂z = (softmax(z) −
    onehot(y))/B in closed form. Norms are Frobenius norms over the batch. Terms:

    - ``adv_grad_ratio`` = ‖ω·g_A‖ / ‖α_CE·g_CE‖ (ω the effective weight of this step; absent
      when α_CE = 0);
    - ``adv_ce_cos`` = cos(g_A, g_CE): > 0 when L_A pushes the way CE does;
    - ``adv_radial`` = cos(−g_A, z − mean_k z): > 0 when a descent step on L_A grows the
      centred logits (inflates them), < 0 when it shrinks them;
    - ``adv_offset_share`` = share of ‖g_A‖² along the per-sample constant shift (the logit
      direction softmax ignores; 0 for a critic on probabilities).
    """
    if not logits.requires_grad:
        return {}
    (g_adv,) = torch.autograd.grad(adversarial, logits, retain_graph=True)
    with torch.no_grad():
        z = logits.detach()
        g_a = g_adv.float()
        g_ce = z.softmax(dim=1)
        g_ce[torch.arange(z.shape[0], device=z.device), targets.long()] -= 1.0
        g_ce = g_ce / z.shape[0]
        n_a, n_ce = g_a.norm(), g_ce.norm()
        centred = z - z.mean(dim=1, keepdim=True)
        out = {
            "adv_ce_cos": (g_a * g_ce).sum() / (n_a * n_ce).clamp_min(_TINY),
            "adv_radial": -(g_a * centred).sum() / (n_a * centred.norm()).clamp_min(_TINY),
            "adv_offset_share": g_a.mean(dim=1).square().sum()
            * z.shape[1]
            / n_a.square().clamp_min(_TINY),
        }
        if alpha_ce > 0:
            out["adv_grad_ratio"] = omega * n_a / (alpha_ce * n_ce).clamp_min(_TINY)
        return out
