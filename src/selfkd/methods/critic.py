"""The Wasserstein critic (discriminator) of AI-KD.

Paper (AI-KD §3.1, §4.2, figure 7a): FC(K→64) → BatchNorm1d → LeakyReLU → FC(64→32). A
Wasserstein critic outputs one score per sample, so (SPEC §1) we append LeakyReLU(0.2) and a
final FC(32→1)::

    Linear(K→h1) → norm → LeakyReLU(0.2) → Linear(h1→h2) → LeakyReLU(0.2) → … → Linear(h_last→1)

``norm`` is ``batchnorm`` (the paper's choice, default), ``layernorm`` or ``none``. BatchNorm
couples the samples of a batch, which the per-sample gradient penalty of WGAN-GP does not assume
(Gulrajani et al. advise against it); the other two keep samples independent. Only the first
hidden layer is normalized, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from selfkd.errors import ConfigError

__all__ = ["CRITIC_NORMS", "Critic"]

CRITIC_NORMS = ("batchnorm", "layernorm", "none")


class Critic(nn.Module):
    """MLP critic scoring a batch of K-dim inputs (logits or probabilities): (B, K) -> (B,)."""

    def __init__(
        self,
        num_inputs: int,
        hidden: Sequence[int] = (64, 32),
        norm: str = "batchnorm",
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        if norm not in CRITIC_NORMS:
            raise ConfigError(f"critic norm must be one of {', '.join(CRITIC_NORMS)}, got {norm!r}")
        hidden = [int(h) for h in hidden]
        if not hidden or any(h < 1 for h in hidden):
            raise ConfigError(f"critic hidden sizes must be positive integers, got {hidden}")
        if num_inputs < 1:
            raise ConfigError(f"critic needs at least one input feature, got {num_inputs}")
        self.norm = norm
        layers: list[nn.Module] = []
        width = num_inputs
        for i, h in enumerate(hidden):
            layers.append(nn.Linear(width, h))
            if i == 0 and norm == "batchnorm":
                layers.append(nn.BatchNorm1d(h))
            elif i == 0 and norm == "layernorm":
                layers.append(nn.LayerNorm(h))
            layers.append(nn.LeakyReLU(negative_slope))
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    @property
    def uses_batchnorm(self) -> bool:
        """Whether scores depend on the other samples of the batch (train mode)."""
        return self.norm == "batchnorm"

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1)).squeeze(1)
