"""AI-KD's hyper-parameters (``AIKDParams``): the paper's defaults, their checks and the
ablations of paper table 4. The method is :mod:`selfkd.methods.aikd`; the choices are in
docs/methods.md (AI-KD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from selfkd.banks import BANK_DTYPES, check_bank_topk
from selfkd.errors import ConfigError
from selfkd.methods.base import check_number
from selfkd.methods.critic import CRITIC_HEADS, CRITIC_NORMS
from selfkd.methods.critic_trainer import CRITIC_BN_MODES, CRITIC_INPUTS

__all__ = ["ABLATIONS", "PREV_SOURCES", "AIKDParams", "omega_steps"]

ABLATIONS = ("none", "no_adv", "only_guide", "only_progressive")
PREV_SOURCES = ("bank", "snapshot")


@dataclass
class AIKDParams:
    """Hyper-parameters of AI-KD (defaults from the paper; see the module docstring)."""

    alpha_ce: float = 0.6
    alpha_g: float = 0.1
    alpha_p: float = 0.3
    omega: float = 0.1
    tau_g: float = 3.0
    tau_p: float = 1.0
    gp_weight: float = 10.0
    critic_lr: float = 1e-4
    critic_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    critic_hidden: list[int] = field(default_factory=lambda: [64, 32])
    critic_norm: str = "batchnorm"
    critic_input: str = "logits"
    #: how a BatchNorm critic normalizes the student batch it scores for L_A
    critic_bn_mode: str = "running"
    #: ``linear``: a final Linear(→1); ``mean``: the paper's last FC layer averaged to a scalar
    critic_head: str = "linear"
    n_critic: int = 1
    #: ω ramps linearly from 0 to ``omega`` over this fraction of the training steps
    omega_warmup: float = 0.0
    #: epochs without L_A before the ramp starts (the critic trains all along)
    omega_start_epoch: int = 0
    #: seed of the phase-1 run (``superior: auto``); None = the student's own ``run.seed``
    superior_seed: int | None = None
    #: log the per-epoch diagnostics (logit norms, max-probabilities, L_A's gradient)
    diagnostics: bool = True
    prev_source: str = "bank"
    bank_dtype: str = "float16"
    #: keep only the top-k log-probabilities per bank row (large class counts); None = dense
    bank_topk: int | None = None
    ablation: str = "none"
    superior: str = "auto"

    def validate(self) -> None:
        """Range and choice checks; ConfigError with the offending key."""
        choices = {
            "critic_norm": CRITIC_NORMS,
            "critic_input": CRITIC_INPUTS,
            "critic_bn_mode": CRITIC_BN_MODES,
            "critic_head": CRITIC_HEADS,
            "prev_source": PREV_SOURCES,
            "bank_dtype": tuple(BANK_DTYPES),
            "ablation": ABLATIONS,
        }
        for key, allowed in choices.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(
                    f"method.{key} must be one of {', '.join(allowed)}, got {value!r}"
                )
        for key in ("alpha_ce", "alpha_g", "alpha_p", "omega", "gp_weight"):
            check_number(key, getattr(self, key), "nonnegative")
        for key in ("tau_g", "tau_p", "critic_lr"):
            check_number(key, getattr(self, key), "positive")
        if len(self.critic_betas) != 2 or not all(0 <= b < 1 for b in self.critic_betas):
            raise ConfigError(
                f"method.critic_betas must be two numbers in [0, 1), got {self.critic_betas}"
            )
        if not self.critic_hidden or any(h < 1 for h in self.critic_hidden):
            raise ConfigError(
                f"method.critic_hidden must be a non-empty list of positive sizes, got "
                f"{self.critic_hidden}"
            )
        check_bank_topk(self.bank_topk)
        if self.critic_head == "mean" and len(self.critic_hidden) < 2:
            raise ConfigError(
                "method.critic_head 'mean' averages the last of at least two hidden layers; "
                f"give method.critic_hidden two or more sizes, got {self.critic_hidden}"
            )
        if not math.isfinite(self.omega_warmup) or not 0 <= self.omega_warmup <= 1:
            raise ConfigError(
                "method.omega_warmup is a fraction of the training steps and must be in [0, 1] "
                f"(a warm-up longer than the run is refused), got {self.omega_warmup}"
            )
        if self.omega_start_epoch < 0:
            raise ConfigError(
                f"method.omega_start_epoch must be >= 0, got {self.omega_start_epoch}"
            )
        if self.superior_seed is not None and not 0 <= self.superior_seed <= 2**63 - 1:
            raise ConfigError(
                "method.superior_seed must be null (the student's seed) or an integer in "
                f"[0, 2**63 - 1], got {self.superior_seed}"
            )
        if self.n_critic < 1:
            raise ConfigError(f"method.n_critic must be at least 1, got {self.n_critic}")
        if not isinstance(self.superior, str) or not self.superior.strip():
            raise ConfigError("method.superior must be 'auto' or a checkpoint path")
        weights = self.weights()
        if weights["alpha_ce"] < 0:
            raise ConfigError(
                f"method.ablation {self.ablation!r} sets alpha_ce = 1 - alpha_g - alpha_p = "
                f"{weights['alpha_ce']:.4g} < 0; lower alpha_g/alpha_p"
            )
        if not any(v > 0 for v in weights.values()):
            raise ConfigError("AI-KD needs at least one positive loss weight")

    def weights(self) -> dict[str, float]:
        """Effective loss weights ``alpha_ce, alpha_g, alpha_p, omega`` after the ablation.

        Ablations of paper table 4; under one, α_CE = 1 − α_G − α_P as in eq. (8).
        """
        alpha_g, alpha_p, omega = self.alpha_g, self.alpha_p, self.omega
        if self.ablation == "none":
            return {
                "alpha_ce": self.alpha_ce,
                "alpha_g": alpha_g,
                "alpha_p": alpha_p,
                "omega": omega,
            }
        omega = 0.0
        if self.ablation == "only_guide":
            alpha_p = 0.0
        elif self.ablation == "only_progressive":
            alpha_g = 0.0
        return {
            "alpha_ce": 1.0 - alpha_g - alpha_p,
            "alpha_g": alpha_g,
            "alpha_p": alpha_p,
            "omega": omega,
        }


def omega_steps(p: AIKDParams, epochs: int, steps_per_epoch: int) -> tuple[int, float]:
    """(first step with L_A, ramp length in steps) from ``omega_start_epoch``/``omega_warmup``;
    ConfigError for a warm-up that ends after the run."""
    total = epochs * steps_per_epoch
    start = p.omega_start_epoch * steps_per_epoch
    ramp = p.omega_warmup * total
    if p.omega_start_epoch > 0 and p.omega_start_epoch >= epochs:
        raise ConfigError(
            f"method.omega_start_epoch {p.omega_start_epoch} leaves no epoch with L_A in a "
            f"run of {epochs} epochs; choose a value below {epochs}"
        )
    if start + ramp > total + 1e-9:
        raise ConfigError(
            f"the warm-up of omega (start at epoch {p.omega_start_epoch}, ramp over "
            f"{p.omega_warmup:g} of the run) ends after the run's last step ({total} steps); "
            "lower method.omega_warmup or method.omega_start_epoch"
        )
    return start, ramp
