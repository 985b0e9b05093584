"""The Wasserstein critic (discriminator) of AI-KD.

Paper (AI-KD §3.1, §4.2, figure 7a): FC(K→64) → BatchNorm1d → LeakyReLU → FC(64→32). A
Wasserstein critic outputs one score per sample. Two readings (``head``):

- ``linear`` (default, SPEC §1): append LeakyReLU(0.2) and a final FC(32→1)::

      Linear(K→h1) → norm → LeakyReLU(0.2) → Linear(h1→h2) → LeakyReLU(0.2) → … → Linear(h_last→1)

- ``mean`` (the paper's figure read literally): the last hidden layer is the final FC, without
  an activation after it, and the score is the mean of its outputs::

      Linear(K→h1) → norm → LeakyReLU(0.2) → … → Linear(h_{n−1}→h_n) → mean over the h_n outputs

  (needs at least two hidden sizes; as a function this is a rank-one final layer, but its
  initial scale and Adam's per-weight steps differ from a ``Linear(h_{n−1}→1)``).

``norm`` is ``batchnorm`` (the paper's choice, default), ``layernorm`` or ``none``. BatchNorm
couples the samples of a batch, which the per-sample gradient penalty of WGAN-GP does not assume
(Gulrajani et al. advise against it); the other two keep samples independent. Only the first
hidden layer is normalized, as in the paper.

``forward(x, batch_stats=True)`` normalizes a BatchNorm critic with the statistics of ``x``
itself, even in eval mode, without touching the running statistics (AI-KD's
``critic_bn_mode: batch`` for scoring the student).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from selfkd.errors import ConfigError

__all__ = ["CRITIC_HEADS", "CRITIC_NORMS", "Critic"]

CRITIC_NORMS = ("batchnorm", "layernorm", "none")
CRITIC_HEADS = ("linear", "mean")


class Critic(nn.Module):
    """MLP critic scoring a batch of K-dim inputs (logits or probabilities): (B, K) -> (B,)."""

    def __init__(
        self,
        num_inputs: int,
        hidden: Sequence[int] = (64, 32),
        norm: str = "batchnorm",
        negative_slope: float = 0.2,
        head: str = "linear",
    ) -> None:
        super().__init__()
        if norm not in CRITIC_NORMS:
            raise ConfigError(f"critic norm must be one of {', '.join(CRITIC_NORMS)}, got {norm!r}")
        if head not in CRITIC_HEADS:
            raise ConfigError(f"critic head must be one of {', '.join(CRITIC_HEADS)}, got {head!r}")
        hidden = [int(h) for h in hidden]
        if not hidden or any(h < 1 for h in hidden):
            raise ConfigError(f"critic hidden sizes must be positive integers, got {hidden}")
        if head == "mean" and len(hidden) < 2:
            raise ConfigError(
                f"critic head 'mean' averages the last of at least two hidden layers, got "
                f"hidden sizes {hidden}; give two or more (the paper's [64, 32])"
            )
        if num_inputs < 1:
            raise ConfigError(f"critic needs at least one input feature, got {num_inputs}")
        self.norm = norm
        self.head = head
        layers: list[nn.Module] = []
        width = num_inputs
        for i, h in enumerate(hidden):
            layers.append(nn.Linear(width, h))
            if i == 0 and norm == "batchnorm":
                layers.append(nn.BatchNorm1d(h))
            elif i == 0 and norm == "layernorm":
                layers.append(nn.LayerNorm(h))
            if head == "linear" or i < len(hidden) - 1:
                layers.append(nn.LeakyReLU(negative_slope))
            width = h
        if head == "linear":
            layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    @property
    def uses_batchnorm(self) -> bool:
        """Whether scores depend on the other samples of the batch (train mode)."""
        return self.norm == "batchnorm"

    def forward(self, x: Tensor, batch_stats: bool = False) -> Tensor:
        """Scores (B,). ``batch_stats``: BatchNorm uses the statistics of ``x`` (running
        statistics neither used nor updated), whatever the mode; no effect without BatchNorm."""
        h = x.flatten(1)
        if batch_stats and self.uses_batchnorm:
            for layer in self.net:
                if isinstance(layer, nn.BatchNorm1d):
                    h = F.batch_norm(
                        h, None, None, layer.weight, layer.bias, training=True, eps=layer.eps
                    )
                else:
                    h = layer(h)
        else:
            h = self.net(h)
        return h.mean(dim=1) if self.head == "mean" else h.squeeze(1)
