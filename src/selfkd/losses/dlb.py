"""DLB loss (self-distillation from the last mini-batch, Shen et al., CVPR 2022).

Step t forwards view 0 of batch t and a fresh view 1 of batch t−1 with the current weights
(logits ``z_cur`` and ``z_prev``); the teacher ``z_saved`` are the logits of batch t−1 on its
view 0, saved at step t−1 (detached)::

    L = CE([z_cur; z_prev], [y_t; y_{t−1}])
        + α · τ² · KL(softmax(sg(z_saved)/τ) ‖ softmax(z_prev/τ))

The CE is the mean over all samples of both halves (the official code concatenates them); the
KL is summed over classes and averaged over batch t−1's samples ("batchmean"). Defaults τ = 3,
α = 1 (paper). At the first step of a run there is no previous batch: L = CE(z_cur, y_t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfkd.losses.core import tempered_kl

__all__ = ["dlb_loss"]


def dlb_loss(
    logits: Tensor,
    targets: Tensor,
    prev_logits: Tensor | None = None,
    prev_targets: Tensor | None = None,
    saved_logits: Tensor | None = None,
    *,
    tau: float = 3.0,
    alpha: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DLB loss of one step; see the module docstring.

    ``logits``/``targets``: batch t on view 0. ``prev_logits``/``prev_targets``: batch t−1 on a
    new view with the current weights; ``saved_logits``: batch t−1's view-0 logits saved at step
    t−1 (detached here). Leave the three ``None`` for the first step. Returns the loss and its
    unweighted terms ``ce`` and ``dlb_kd`` (the τ²-scaled KL; 0 at the first step).
    """
    given = [x is not None for x in (prev_logits, prev_targets, saved_logits)]
    if any(given) and not all(given):
        raise ValueError("dlb: give prev_logits, prev_targets and saved_logits together or none")
    if prev_logits is None:
        ce = F.cross_entropy(logits.float(), targets)
        kd = torch.zeros((), device=logits.device)
        return ce, {"ce": ce.detach(), "dlb_kd": kd}
    assert prev_targets is not None and saved_logits is not None
    if saved_logits.shape != prev_logits.shape:
        raise ValueError(
            f"dlb: saved logits {tuple(saved_logits.shape)} do not match the previous batch's "
            f"logits {tuple(prev_logits.shape)}"
        )
    ce = F.cross_entropy(
        torch.cat([logits, prev_logits]).float(), torch.cat([targets, prev_targets])
    )
    kd = tempered_kl(saved_logits, prev_logits, tau)
    loss = ce + alpha * kd
    return loss, {"ce": ce.detach(), "dlb_kd": kd.detach()}
