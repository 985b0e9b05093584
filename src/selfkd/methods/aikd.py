"""AI-KD: adversarial learning and implicit regularization for self-KD.

Kim, Suh et al., "AI-KD: Adversarial learning and Implicit regularization for self-Knowledge
Distillation", Knowledge-Based Systems 2024 (arXiv 2211.10938). No official code exists; the
decisions below are ours (SPEC §1, research/official-code-notes.md §8).

Two phases (paper §3.1, figure 2):

1. Train the *superior* model S_sup: same architecture, data and schedule, plain CE.
2. Train the student S_t from scratch with (paper eq. (8), (4), (5), (7))::

       L_AI = α_CE·CE(z_t, y) + α_G·L_G + α_P·L_P + ω·L_A
       L_G  = τ_G²·KL(p_sup(τ_G) ‖ p_t(τ_G))      guide: the superior model's knowledge
       L_P  = τ_P²·KL(p_{t−1}(τ_P) ‖ p_t(τ_P))    progressive: previous-epoch predictions
       L_A  = −mean D(z_t)                        adversarial: fool the critic

   while a critic D is trained each step with the WGAN-GP loss (paper eq. (6))::

       L_D = mean D(sg(z_t)) − mean D(z_sup) + λ·mean (‖∇_x̂ D(x̂)‖₂ − 1)²,
       x̂  = ε·z_sup + (1−ε)·sg(z_t),  ε ~ U(0,1) per sample.

Defaults (``AIKDParams``): α_CE 0.6, α_G 0.1, α_P 0.3 (paper table 6), ω 0.1 (table 5), τ_G 3,
τ_P 1 (figure 7b), λ 10 and critic Adam lr 1e-4 (§4.2), critic FC 64 → 32 (§4.2, figure 7a).
The critic's Adam betas (0.5, 0.9) and n_critic 1 (one critic update per student step) are ours;
the paper gives neither. WGAN-GP's Algorithm 1 (Gulrajani et al. 2017) uses betas (0, 0.9) and
5 critic updates: ``--set method.critic_betas=[0,0.9] --set method.n_critic=5``.

Decisions (SPEC §1):

- **Critic** (:mod:`selfkd.methods.critic`): Linear(K→64) → norm → LeakyReLU(0.2) →
  Linear(64→32) → LeakyReLU(0.2) → Linear(32→1). The paper stops at FC(32); a Wasserstein critic
  needs one score, hence the final layer. ``critic_norm``: ``batchnorm`` (paper, default),
  ``layernorm`` or ``none`` (BatchNorm couples samples, which the per-sample gradient penalty
  does not assume). ``critic_head``: ``linear`` (default) or ``mean`` (the paper's figure read
  literally: no layer after FC(32), the score is the mean of its 32 outputs). ``critic_input``:
  ``logits`` (paper §4.2), ``probs`` (softmax, both sides) or ``log_probs`` (log-softmax).
- **Step order**: forward the student (with grad) and the superior (eval mode, ``no_grad``, same
  augmented batch); take the previous-epoch predictions; update the critic ``n_critic`` times on
  detached float32 inputs with its own Adam optimizer and autocast disabled (mixed-precision
  safe); a non-finite critic loss raises :class:`~selfkd.errors.TrainingError` naming the global
  step; then compute L_AI with the critic frozen (no parameter gradient, eval mode: a BatchNorm
  critic scores the student with its running statistics, or with the student batch's own
  statistics under ``critic_bn_mode: batch``, running statistics untouched) and return it for
  the engine to step.
- **Warm-up of ω**: ``omega_start_epoch`` epochs without L_A, then a linear ramp from 0 to ω over
  ``omega_warmup`` (a fraction of all training steps); the critic trains from the first step. A
  warm-up that would end after the run is refused (ConfigError) at setup.
- **Superior seed** ``superior_seed``: null (the student's ``run.seed``, default) or the seed of
  the phase-1 run that ``superior: auto`` trains or reuses (:meth:`AIKD.teacher_seed`), i.e. an
  independently initialized superior with its own data order.
- **Critic batches**: real, fake and interpolated samples go through the critic in one forward
  (shared BatchNorm statistics, see :func:`selfkd.losses.wgan_critic_loss`). A BatchNorm critic
  cannot train on a batch of one sample: such a step skips the critic update and the adversarial
  term (warned once) and reports the term ``adv_skipped = 1`` (0 on normal steps).
- **Previous-epoch predictions** ``prev_source``: ``bank`` (default) keeps per-sample
  log-probabilities of the previous epoch's training forward (augmented input, train-mode BN,
  weights before the step) in a :class:`~selfkd.banks.PredictionBank` (``bank_dtype``, fp16 by
  default; ``bank_topk: k`` keeps only the top-k entries per row, see
  :mod:`selfkd.banks`), as PS-KD does; ``snapshot`` keeps a frozen copy of the weights at the
  end of epoch t−1 and runs it (eval mode, ``no_grad``) on the current batch: the literal
  reading of the paper, one extra forward per step. Epoch 0 has no previous model: both start
  from the one-hot labels (L_P is then τ_P²·CE at temperature τ_P).
- **Ablations** ``ablation`` (paper table 4): ``no_adv`` → ω = 0; ``only_guide`` → α_P = 0,
  ω = 0; ``only_progressive`` → α_G = 0, ω = 0 (needs no superior model). Under an ablation the
  given ``alpha_ce`` is replaced by 1 − α_G − α_P, the weighting of eq. (8). Without one the
  weights are used as given; a sum α_CE + α_G + α_P ≠ 1 is warned about, not renormalized.
- **Superior**: ``superior`` is a phase-1 checkpoint path or ``auto`` (the engine trains or reuses
  phase 1 and replaces ``auto`` by the path before :meth:`AIKD.setup`). The loaded model stays in
  eval mode with ``requires_grad=False`` and is not part of the method's parameters or
  ``state_dict`` (it is held in a plain dict, so ``method.train()`` does not reach it).
- **State**: the bank and the critic are submodules (in ``state_dict``); the critic's optimizer
  state and the snapshot weights go through ``get_extra_state`` (tensors, dicts, lists, tuples,
  numbers and strings only, loadable with ``torch.load(weights_only=True)``). The critic has its
  own optimizer: :meth:`AIKD.main_optimizer_modules` is empty.
- Terms logged: ``ce``, ``guide``, ``progressive``, ``adversarial`` (unweighted; a term whose
  weight is 0 is absent), ``critic_loss``, ``critic_wdist`` (mean D(real) − mean D(fake)),
  ``critic_gp``, ``adv_skipped`` (when ω > 0), ``omega_eff`` (with a warm-up) and ``loss`` (the
  total L_AI). Diagnostics (``diagnostics: true``, default; device tensors, no host read, no
  effect on the loss or its gradient): :func:`output_stats` of the student and the superior and,
  when L_A is computed, :func:`adversarial_gradient_stats`.
- **DDP** (the engine plugs in both hooks): the bank's ``update`` goes through
  :attr:`AIKD.gather` (every rank writes every rank's rows, so all banks are identical); the
  critic's gradients and BatchNorm running statistics are averaged over the ranks before each
  critic step (``MethodContext.reduce_grads``), so all critics stay identical. A rank whose
  batch-of-one step skips the critic still takes the averaged step of the other ranks.
- **With Cutout/Mixup/CutMix** (``data.mix``; paper table 7 reports AI-KD + each, without
  details): ``mixing = "split"``, PS-KD's rule (PS-KD §4.1): the engine mixes a random half of
  the batch (``batch.mix.rows``). Unmixed rows take L_AI exactly as above: the superior forward,
  the previous-epoch predictions, the critic update and L_G/L_P/L_A use the unmixed rows only.
  Mixed rows take the mixing CE on hard labels λ·CE(z, y) + (1−λ)·CE(z, y[π]). The step loss is
  ``(n_unmixed·L_AI + n_mixed·L_mix)/B`` (:func:`selfkd.losses.mixing.split_loss`); only unmixed
  rows are written to the bank (a mixed image's prediction is not one of sample i). Terms: the
  L_AI terms over unmixed rows, ``mix_ce`` over mixed rows, ``loss`` the combined step loss.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from selfkd.banks import BANK_DTYPES, Gather, PredictionBank, bank_storage, check_bank_topk
from selfkd.errors import ConfigError
from selfkd.losses import aikd_loss, wgan_critic_loss
from selfkd.losses.core import frozen
from selfkd.losses.mixing import mixed_ce, split_loss
from selfkd.methods.base import (
    METHODS,
    Batch,
    Method,
    MethodContext,
    StepInfo,
    StepOutput,
    frozen_forward,
    inference_logits,
)
from selfkd.methods.critic import CRITIC_HEADS, CRITIC_NORMS, Critic
from selfkd.models.taps import unwrap_model

__all__ = ["ABLATIONS", "AIKD", "AIKDParams"]

ABLATIONS = ("none", "no_adv", "only_guide", "only_progressive")
CRITIC_INPUTS = ("logits", "probs", "log_probs")
CRITIC_BN_MODES = ("running", "batch")
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
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"method.{key} must be a finite number >= 0, got {value}")
        for key in ("tau_g", "tau_p", "critic_lr"):
            value = getattr(self, key)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"method.{key} must be > 0, got {value}")
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


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast disabled for ``device`` (a no-op where autocast does not exist)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # pragma: no cover - exotic device types
        return contextlib.nullcontext()


def _clone_state(value: Any) -> Any:
    """Deep copy of a state made of tensors, dicts, lists, tuples and scalars (no aliasing)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone_state(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone_state(v) for v in value)
    return value


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _one_hot_log_probs(targets: Tensor, num_classes: int) -> Tensor:
    """Log-probabilities of one-hot labels: 0 at the label, -inf elsewhere (B×K, float32)."""
    out = torch.full(
        (targets.shape[0], num_classes), float("-inf"), device=targets.device, dtype=torch.float32
    )
    return out.scatter_(1, targets.long()[:, None], 0.0)


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


@METHODS.register("aikd", "ai-kd")
class AIKD(Method):
    """AI-KD: superior-model guide + previous-epoch KD + WGAN-GP adversarial alignment."""

    name = "aikd"
    Params = AIKDParams
    teacher_param = "superior"
    mixing = "split"

    critic: Critic | None
    bank: PredictionBank | None

    def __init__(self, params: AIKDParams | None = None) -> None:
        super().__init__(params)
        p: AIKDParams = self.params
        p.validate()
        self.weights = p.weights()
        total = self.weights["alpha_ce"] + self.weights["alpha_g"] + self.weights["alpha_p"]
        if abs(total - 1.0) > 1e-6:
            warnings.warn(
                f"AI-KD weights alpha_ce + alpha_g + alpha_p = {total:.6g} != 1 (paper eq. (8) "
                "uses alpha_ce = 1 - alpha_g - alpha_p); using them as given",
                stacklevel=2,
            )
        self.critic = None
        self.bank = None
        self.critic_optimizer: torch.optim.Optimizer | None = None
        #: DDP hook for the bank: ``gather(indices, logits) -> (indices, logits)`` of all ranks
        self.gather: Gather | None = None
        #: DDP hook for the critic (``MethodContext.reduce_grads``); None in a single process
        self._reduce_grads: Callable[..., bool] | None = None
        # frozen models live in a plain dict: not submodules, so not in parameters()/state_dict()
        # and untouched by method.train()
        self._frozen: dict[str, nn.Module | None] = {"superior": None, "snapshot": None}
        self._build_model: Callable[[], nn.Module] | None = None
        self._device: torch.device | None = None
        self._num_classes: int | None = None
        self._pending_state: dict[str, Any] | None = None
        self._is_setup = False
        self._warned_batch_one = False
        #: (first step with L_A, ramp length in steps), set by setup from the run's length
        self._omega_steps: tuple[int, float] = (0, 0.0)

    # --- frozen models ----------------------------------------------------------------------
    @property
    def superior(self) -> nn.Module | None:
        """The phase-1 superior model (eval mode, frozen), or None when not needed."""
        return self._frozen["superior"]

    @property
    def snapshot(self) -> nn.Module | None:
        """The end-of-previous-epoch copy of the student (``prev_source: snapshot``)."""
        return self._frozen["snapshot"]

    def needs_teacher(self) -> bool:
        return self.weights["alpha_g"] > 0 or self.weights["omega"] > 0

    def teacher_seed(self, run_seed: int) -> int:
        seed = self.params.superior_seed
        return run_seed if seed is None else seed

    def train(self, mode: bool = True) -> AIKD:
        super().train(mode)
        for model in self._frozen.values():
            if model is not None:
                model.eval()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> AIKD:
        # .to()/.cuda() of the method also move the frozen models
        super()._apply(fn, recurse)
        for model in self._frozen.values():
            if model is not None:
                model._apply(fn, recurse)
        return self

    # --- life cycle -------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        p: AIKDParams = self.params
        self._build_model = ctx.build_model
        self._device = torch.device(ctx.device)
        self._num_classes = ctx.num_classes
        self._reduce_grads = ctx.reduce_grads
        if self.needs_teacher():
            if p.superior == "auto":
                raise ConfigError(
                    "method.superior is 'auto' but no phase-1 checkpoint was resolved before "
                    "setup; give a checkpoint path or let the engine train phase 1"
                )
            self._frozen["superior"] = _freeze(ctx.load_model(p.superior))
        if self.weights["omega"] > 0:
            self._omega_schedule(ctx.epochs, ctx.steps_per_epoch)
            self.critic = Critic(
                ctx.num_classes, p.critic_hidden, p.critic_norm, head=p.critic_head
            ).to(self._device)
            self.critic_optimizer = torch.optim.Adam(
                self.critic.parameters(), lr=p.critic_lr, betas=tuple(p.critic_betas)
            )
        if self.weights["alpha_p"] > 0 and p.prev_source == "bank":
            self.bank = PredictionBank(
                ctx.num_train,
                ctx.num_classes,
                ctx.train_labels,
                dtype=p.bank_dtype,
                **bank_storage("aikd", p.bank_topk, ctx.num_classes),
                device=self._device,  # on the training device: no host copy in a step
            )
        self._is_setup = True
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._load_extra(state)

    def main_optimizer_modules(self) -> list[nn.Module]:
        return []

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        if not self._is_setup:
            raise RuntimeError("AIKD.setup(model, ctx) must be called before training_step")
        w = self.weights
        p: AIKDParams = self.params
        all_logits = model(batch.inputs)
        logits, mix, batch_targets = all_logits, batch.mix, batch.targets
        if mix is not None:  # data.mix: L_AI on the unmixed rows only (PS-KD §4.1's rule)
            keep = mix.unmixed_rows()  # positions, not a mask: no host read of the count
            logits = all_logits[keep]
            if logits.shape[0] == 0:
                raise ConfigError(
                    "method aikd needs unmixed rows in every batch: use data.mix's split rule"
                )
            batch = dataclasses.replace(
                batch,
                inputs=batch.inputs[keep],
                targets=batch.targets[keep],
                indices=batch.indices[keep],
                raw=batch.raw[keep],
                mix=None,
            )
        superior_logits = None
        if self.needs_teacher():
            superior = self._frozen["superior"]
            assert superior is not None
            superior_logits = frozen_forward(
                superior, batch.inputs, logits, "superior model", self.name
            )
        prev = self._previous(batch, logits) if w["alpha_p"] > 0 else None

        extra: dict[str, Tensor] = {}
        adversarial = w["omega"] > 0
        if adversarial:
            assert self.critic is not None and superior_logits is not None
            if self.critic.uses_batchnorm and logits.shape[0] < 2:
                if not self._warned_batch_one:
                    warnings.warn(
                        "AI-KD: a BatchNorm critic cannot train on a batch of one sample; "
                        "skipping the critic update and the adversarial term for such steps "
                        "(term adv_skipped = 1)",
                        stacklevel=2,
                    )
                    self._warned_batch_one = True
                adversarial = False
                extra["adv_skipped"] = torch.ones((), device=logits.device)
                self._follow_critic_step()
            else:
                extra.update(self._update_critic(logits, superior_logits))
                extra["adv_skipped"] = torch.zeros((), device=logits.device)
        omega = self.omega_at(info.global_step) if w["omega"] > 0 else 0.0
        if w["omega"] > 0 and self._omega_steps != (0, 0.0):
            extra["omega_eff"] = torch.full((), omega, device=logits.device)

        with _no_autocast(logits.device):
            loss, terms = aikd_loss(
                logits,
                batch.targets,
                superior_logits,
                prev,
                None,  # L_A below: critic input, BatchNorm mode and warm-up are ours
                alpha_ce=w["alpha_ce"],
                alpha_g=w["alpha_g"],
                alpha_p=w["alpha_p"],
                omega=0.0,
                tau_g=p.tau_g,
                tau_p=p.tau_p,
            )
            student = logits.float()
            if adversarial:
                adv = self._adversarial(student)
                if omega > 0:
                    loss = loss + omega * adv
                terms["adversarial"] = adv.detach()
            if p.diagnostics:
                extra.update(output_stats("student", student.detach()))
                if superior_logits is not None:
                    extra.update(output_stats("superior", superior_logits.detach().float()))
                if adversarial:
                    extra.update(
                        adversarial_gradient_stats(
                            student, batch.targets, adv, omega=omega, alpha_ce=w["alpha_ce"]
                        )
                    )
        terms = {**terms, **extra}
        if mix is not None:
            mix_loss = mixed_ce(all_logits, batch_targets, mix)
            loss = split_loss(loss, mix_loss, mix)
            terms["mix_ce"] = mix_loss.detach()
        terms["loss"] = loss.detach()
        return StepOutput(loss=loss, logits=all_logits, targets=batch_targets, terms=terms)

    def after_optimizer_step(self, model: nn.Module, batch: Batch, out: StepOutput) -> None:
        # the step's (pre-update) training predictions become next epoch's p_{t-1};
        # mixed rows are not predictions of their sample and are not written
        if self.bank is not None:
            self.bank.update_unmixed(batch.indices, out.logits, batch.mix, gather=self.gather)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        if self.weights["alpha_p"] > 0 and self.params.prev_source == "snapshot":
            self._refresh_snapshot(unwrap_model(model).state_dict(), template=model)

    # --- pieces of a step -------------------------------------------------------------------
    def _previous(self, batch: Batch, logits: Tensor) -> Tensor:
        """Previous-epoch predictions for the batch: log-probs (bank) or logits (snapshot)."""
        if self.params.prev_source == "bank":
            assert self.bank is not None
            return self.bank.lookup(batch.indices).to(logits.device, non_blocking=True)
        snapshot = self._frozen["snapshot"]
        if snapshot is None:  # epoch 0: no previous model, one-hot labels as the bank
            return _one_hot_log_probs(batch.targets, logits.shape[1])
        return inference_logits(snapshot, batch.inputs)

    def _update_critic(self, logits: Tensor, superior_logits: Tensor) -> dict[str, Tensor]:
        """n_critic Adam steps of the WGAN-GP critic loss on detached float32 inputs."""
        critic, optimizer = self.critic, self.critic_optimizer
        assert critic is not None and optimizer is not None
        real = self._critic_view(superior_logits.detach().float())
        fake = self._critic_view(logits.detach().float())
        critic.train()
        with _no_autocast(logits.device), torch.enable_grad():
            for _ in range(self.params.n_critic):
                # no host check here: a NaN/Inf critic loss shows in the returned terms, which the
                # engine watches on the device (selfkd.engine.guard) like the loss itself
                loss, terms = wgan_critic_loss(critic, real, fake, self.params.gp_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self._reduce_grads is None or self._reduce_grads(critic):
                    optimizer.step()
        return {"critic_loss": loss.detach(), **terms}

    def _critic_view(self, logits: Tensor) -> Tensor:
        """What the critic sees of float32 logits (``critic_input``)."""
        kind = self.params.critic_input
        if kind == "probs":
            return logits.softmax(dim=1)
        if kind == "log_probs":
            return logits.log_softmax(dim=1)
        return logits

    def _adversarial(self, student: Tensor) -> Tensor:
        """L_A = −mean D(view(z_t)) with the critic frozen (no parameter gradient, eval mode);
        ``critic_bn_mode: batch`` normalizes a BatchNorm critic by the student batch itself."""
        critic = self.critic
        assert critic is not None
        with frozen(critic):
            scores = critic(
                self._critic_view(student), batch_stats=self.params.critic_bn_mode == "batch"
            )
        return -scores.mean()

    def _omega_schedule(self, epochs: int, steps_per_epoch: int) -> None:
        """Turn ``omega_start_epoch``/``omega_warmup`` into steps; refuse one past the run."""
        p: AIKDParams = self.params
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
        self._omega_steps = (start, ramp)

    def omega_at(self, global_step: int) -> float:
        """Effective ω at a global step: 0 before ``omega_start_epoch``, then a linear ramp from
        0 over ``omega_warmup`` of the run's steps, then ω (host arithmetic, no device read)."""
        omega = self.weights["omega"]
        start, ramp = self._omega_steps
        if global_step < start:
            return 0.0
        if ramp > 0:
            return omega * min(1.0, (global_step - start) / ramp)
        return omega

    def _follow_critic_step(self) -> None:
        """DDP, this rank has no critic batch: take the other ranks' averaged critic steps."""
        if self._reduce_grads is None:
            return
        critic, optimizer = self.critic, self.critic_optimizer
        assert critic is not None and optimizer is not None
        for _ in range(self.params.n_critic):
            optimizer.zero_grad(set_to_none=True)
            if self._reduce_grads(critic, active=False):
                optimizer.step()

    # --- snapshot and state -----------------------------------------------------------------
    def _refresh_snapshot(
        self, weights: dict[str, Tensor], template: nn.Module | None = None
    ) -> None:
        snapshot = self._frozen["snapshot"]
        if snapshot is None:
            if self._build_model is not None:
                snapshot = self._build_model()
            elif template is not None:
                snapshot = copy.deepcopy(unwrap_model(template))
            else:
                raise RuntimeError("AI-KD cannot build a snapshot model before setup")
            if self._device is not None:
                snapshot = snapshot.to(self._device)
            self._frozen["snapshot"] = snapshot
        snapshot.load_state_dict(weights)
        _freeze(snapshot)

    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"version": 1}
        if self.critic_optimizer is not None:
            state["critic_optimizer"] = _clone_state(self.critic_optimizer.state_dict())
        if self.params.prev_source == "snapshot":
            snapshot = self._frozen["snapshot"]
            state["snapshot"] = (
                None if snapshot is None else _clone_state(dict(snapshot.state_dict()))
            )
        return state

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            return
        if not self._is_setup:  # loaded before setup: applied at the end of setup
            self._pending_state = state
            return
        self._load_extra(state)

    def _load_extra(self, state: dict[str, Any]) -> None:
        optimizer_state = state.get("critic_optimizer")
        if optimizer_state is not None and self.critic_optimizer is not None:
            self.critic_optimizer.load_state_dict(_clone_state(optimizer_state))
        if self.params.prev_source == "snapshot" and "snapshot" in state:
            if state["snapshot"] is None:
                self._frozen["snapshot"] = None
            else:
                self._refresh_snapshot(state["snapshot"])
