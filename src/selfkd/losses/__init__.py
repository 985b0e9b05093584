"""Loss functions of the self-KD methods, usable without the training engine.

Every function takes plain tensors (and, for adversarial losses, a critic module) and returns a
batch-mean scalar (some also a dict of named terms); each docstring gives the formula and the
paper. One module per family: ``core`` (tempered KL, soft-target CE, WGAN-GP critic, AI-KD),
``smoothing`` (label smoothing, TF-KD), ``pskd``, ``cskd``, ``drg`` (DRG, DSR), ``byot``,
``dlb``, ``zfls`` and ``mixing`` (Mixup/CutMix targets).
"""

from selfkd.losses.byot import byot_loss, feature_hint_loss
from selfkd.losses.core import (
    adversarial_loss,
    aikd_loss,
    freeze,
    frozen,
    gradient_penalty,
    soft_target_ce,
    tempered_kl,
    wgan_critic_loss,
)
from selfkd.losses.cskd import cskd_loss
from selfkd.losses.dlb import dlb_loss
from selfkd.losses.drg import drg_dsr_loss, reverse_guidance_loss, shape_regularization_loss
from selfkd.losses.mixing import mixed_ce, mixed_targets, split_loss
from selfkd.losses.pskd import pskd_alpha, pskd_loss, pskd_targets
from selfkd.losses.smoothing import (
    label_smoothing_loss,
    smoothed_targets,
    tfkd_kd_weight,
    tfkd_reg_loss,
    tfkd_self_loss,
    virtual_teacher,
)
from selfkd.losses.zfls import min_ranks, zfls_loss, zipf_targets

__all__ = [
    "adversarial_loss",
    "aikd_loss",
    "byot_loss",
    "cskd_loss",
    "dlb_loss",
    "drg_dsr_loss",
    "feature_hint_loss",
    "freeze",
    "frozen",
    "gradient_penalty",
    "label_smoothing_loss",
    "min_ranks",
    "mixed_ce",
    "mixed_targets",
    "pskd_alpha",
    "pskd_loss",
    "pskd_targets",
    "reverse_guidance_loss",
    "shape_regularization_loss",
    "smoothed_targets",
    "soft_target_ce",
    "split_loss",
    "tempered_kl",
    "tfkd_kd_weight",
    "tfkd_reg_loss",
    "tfkd_self_loss",
    "virtual_teacher",
    "wgan_critic_loss",
    "zfls_loss",
    "zipf_targets",
]
