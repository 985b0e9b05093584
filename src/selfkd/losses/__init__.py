"""Loss functions of the self-KD methods, usable without the training engine.

Every function takes plain tensors (and, for adversarial losses, a critic module) and returns a
batch-mean scalar; each docstring gives the formula and the paper. One module per family:
``core`` (tempered KL, soft-target CE, WGAN-GP critic, AI-KD) and one per compared method.
"""

from selfkd.losses.core import (
    adversarial_loss,
    aikd_loss,
    frozen,
    gradient_penalty,
    soft_target_ce,
    tempered_kl,
    wgan_critic_loss,
)

__all__ = [
    "adversarial_loss",
    "aikd_loss",
    "frozen",
    "gradient_penalty",
    "soft_target_ce",
    "tempered_kl",
    "wgan_critic_loss",
]
