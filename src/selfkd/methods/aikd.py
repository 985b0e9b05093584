"""AI-KD: adversarial learning and implicit regularization for self-KD.

Kim, Suh et al., "AI-KD: Adversarial learning and Implicit regularization for self-Knowledge
Distillation", Knowledge-Based Systems 2024 (arXiv 2211.10938). No official code exists; the
decisions are ours (SPEC §1) and are written out in docs/methods.md (AI-KD).

Phase 1 trains the *superior* model S_sup (same architecture, data and schedule, plain CE); phase
2 trains the student S_t from scratch with paper eq. (8), (4), (5), (7)::

    L_AI = α_CE·CE(z_t, y) + α_G·L_G + α_P·L_P + ω·L_A
    L_G  = τ_G²·KL(p_sup(τ_G) ‖ p_t(τ_G))      guide: the superior model's knowledge
    L_P  = τ_P²·KL(p_{t−1}(τ_P) ‖ p_t(τ_P))    progressive: previous-epoch predictions
    L_A  = −mean D(z_t)                        adversarial: fool the critic

while the critic D trains each step with the WGAN-GP loss of eq. (6). The pieces:
:mod:`~selfkd.methods.aikd_params` (defaults: α_CE 0.6, α_G 0.1, α_P 0.3, ω 0.1, τ_G 3, τ_P 1;
ablations), :mod:`~selfkd.methods.critic_trainer` (D, its Adam optimizer, L_A),
:mod:`~selfkd.methods.previous` (p_{t−1} from a bank or a snapshot) and
:mod:`~selfkd.methods.diagnostics`. With ``data.mix`` the method takes the split rule
(:func:`~selfkd.methods.base.split_step`): L_AI on the unmixed rows, the mixing CE on the others.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from selfkd.banks import PredictionBank, bank_storage
from selfkd.errors import ConfigError
from selfkd.losses import aikd_loss
from selfkd.methods.aikd_params import ABLATIONS, AIKDParams, omega_steps
from selfkd.methods.base import (
    METHODS,
    Batch,
    Method,
    MethodContext,
    StepInfo,
    StepOutput,
    frozen_forward,
    no_autocast,
    split_step,
)
from selfkd.methods.critic import Critic
from selfkd.methods.critic_trainer import CriticTrainer
from selfkd.methods.diagnostics import adversarial_gradient_stats, output_stats
from selfkd.methods.previous import BankSource, SnapshotSource
from selfkd.models.taps import unwrap_model

__all__ = ["ABLATIONS", "AIKD", "AIKDParams"]


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
        self.weights = self.params.weights()
        total = self.weights["alpha_ce"] + self.weights["alpha_g"] + self.weights["alpha_p"]
        if abs(total - 1.0) > 1e-6:
            warnings.warn(
                f"AI-KD weights alpha_ce + alpha_g + alpha_p = {total:.6g} != 1 (paper eq. (8) "
                "uses alpha_ce = 1 - alpha_g - alpha_p); using them as given",
                stacklevel=2,
            )
        self.critic = None  # a submodule once set up (its weights are in state_dict)
        self.bank = None
        self.critic_trainer: CriticTrainer | None = None
        #: where p_{t−1} comes from; a snapshot source exists from the start (its extra state)
        self.previous: BankSource | SnapshotSource | None = None
        if self.params.prev_source == "snapshot":
            self.previous = SnapshotSource(self)
        self._pending_state: dict[str, Any] | None = None
        self._is_setup = False
        self._warned_batch_one = False
        #: (first step with L_A, ramp length in steps), set by setup from the run's length
        self._omega_steps: tuple[int, float] = (0, 0.0)

    @property
    def superior(self) -> nn.Module | None:
        """The phase-1 superior model (eval mode, frozen), or None when not needed."""
        return self.held("superior")

    @property
    def snapshot(self) -> nn.Module | None:
        """The end-of-previous-epoch copy of the student (``prev_source: snapshot``)."""
        return self.held("snapshot")

    @property
    def critic_optimizer(self) -> torch.optim.Optimizer | None:
        """The critic's own Adam optimizer (None without L_A)."""
        return None if self.critic_trainer is None else self.critic_trainer.optimizer

    def needs_teacher(self) -> bool:
        return self.weights["alpha_g"] > 0 or self.weights["omega"] > 0

    def teacher_seed(self, run_seed: int) -> int:
        seed = self.params.superior_seed
        return run_seed if seed is None else seed

    # --- life cycle -------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        p: AIKDParams = self.params
        device = torch.device(ctx.device)
        if self.needs_teacher():
            if p.superior == "auto":
                raise ConfigError(
                    "method.superior is 'auto' but no phase-1 checkpoint was resolved before "
                    "setup; give a checkpoint path or let the engine train phase 1"
                )
            self.hold("superior", ctx.load_model(p.superior))
        if self.weights["omega"] > 0:
            self._omega_steps = omega_steps(p, ctx.epochs, ctx.steps_per_epoch)
            self.critic = Critic(
                ctx.num_classes, p.critic_hidden, p.critic_norm, head=p.critic_head
            ).to(device)
            self.critic_trainer = CriticTrainer(
                self.critic,
                lr=p.critic_lr,
                betas=(p.critic_betas[0], p.critic_betas[1]),
                n_critic=p.n_critic,
                gp_weight=p.gp_weight,
                view=p.critic_input,
                bn_mode=p.critic_bn_mode,
                reduce_grads=ctx.reduce_grads,
            )
        if self.weights["alpha_p"] > 0 and p.prev_source == "bank":
            self.bank = PredictionBank(
                ctx.num_train,
                ctx.num_classes,
                ctx.train_labels,
                dtype=p.bank_dtype,
                **bank_storage("aikd", p.bank_topk, ctx.num_classes),
                device=device,  # on the training device: no host copy in a step
            )
            self.previous = BankSource(self.bank, ctx.gather)
        if isinstance(self.previous, SnapshotSource):
            self.previous.build_model, self.previous.device = ctx.build_model, device
        self._is_setup = True
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._load_extra(state)

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        if not self._is_setup:
            raise RuntimeError("AIKD.setup(model, ctx) must be called before training_step")
        out = split_step(model, batch, info, self._objective)
        out.terms["loss"] = out.loss.detach()
        return out

    def after_optimizer_step(self, model: nn.Module, batch: Batch, out: StepOutput) -> None:
        if isinstance(self.previous, BankSource):
            self.previous.write(batch, out.logits)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        if self.weights["alpha_p"] > 0 and isinstance(self.previous, SnapshotSource):
            self.previous.refresh(unwrap_model(model).state_dict(), template=model)

    # --- eq. (8) on the unmixed rows --------------------------------------------------------
    def _objective(
        self, logits: Tensor, batch: Batch, info: StepInfo
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """L_AI of eq. (8) and its terms; trains the critic (eq. (6)) on the way."""
        w, p = self.weights, self.params
        if logits.shape[0] == 0:
            raise ConfigError(
                "method aikd needs unmixed rows in every batch: use data.mix's split rule"
            )
        z_sup = None
        if self.needs_teacher():
            superior = self.held("superior")
            assert superior is not None
            z_sup = frozen_forward(superior, batch.inputs, logits, "superior model", self.name)
        prev = None
        if w["alpha_p"] > 0:
            assert self.previous is not None
            prev = self.previous.lookup(batch, logits)  # p_{t−1}
        extra, adversarial = self._train_critic(logits, z_sup)
        omega = self.omega_at(info.global_step) if w["omega"] > 0 else 0.0
        if w["omega"] > 0 and self._omega_steps != (0, 0.0):
            extra["omega_eff"] = torch.full((), omega, device=logits.device)
        with no_autocast(logits.device):
            loss, terms = aikd_loss(
                logits,
                batch.targets,
                z_sup,
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
            adv = None
            if adversarial:
                assert self.critic_trainer is not None
                adv = self.critic_trainer.adversarial(student)
                if omega > 0:
                    loss = loss + omega * adv
                terms["adversarial"] = adv.detach()
            if p.diagnostics:
                extra.update(self._diagnostics(student, z_sup, batch.targets, adv, omega))
        return loss, {**terms, **extra}

    def _train_critic(self, logits: Tensor, z_sup: Tensor | None) -> tuple[dict, bool]:
        """The critic's update for this step: (its terms, whether L_A is computed)."""
        trainer = self.critic_trainer
        if self.weights["omega"] <= 0 or trainer is None:
            return {}, False
        assert self.critic is not None and z_sup is not None
        if self.critic.uses_batchnorm and logits.shape[0] < 2:
            if not self._warned_batch_one:
                warnings.warn(
                    "AI-KD: a BatchNorm critic cannot train on a batch of one sample; "
                    "skipping the critic update and the adversarial term for such steps "
                    "(term adv_skipped = 1)",
                    stacklevel=2,
                )
                self._warned_batch_one = True
            trainer.follow()  # DDP: the other ranks' averaged critic steps
            return {"adv_skipped": torch.ones((), device=logits.device)}, False
        terms = trainer.update(z_sup, logits)
        return {**terms, "adv_skipped": torch.zeros((), device=logits.device)}, True

    def _diagnostics(
        self,
        student: Tensor,
        z_sup: Tensor | None,
        targets: Tensor,
        adv: Tensor | None,
        omega: float,
    ) -> dict[str, Tensor]:
        out = output_stats("student", student.detach())
        if z_sup is not None:
            out.update(output_stats("superior", z_sup.detach().float()))
        if adv is not None:
            alpha_ce = self.weights["alpha_ce"]
            out.update(
                adversarial_gradient_stats(student, targets, adv, omega=omega, alpha_ce=alpha_ce)
            )
        return out

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

    # --- state ------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"version": 1}
        if self.critic_trainer is not None:
            state["critic_optimizer"] = self.critic_trainer.state_dict()
        if isinstance(self.previous, SnapshotSource):
            state["snapshot"] = self.previous.state()
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
        if optimizer_state is not None and self.critic_trainer is not None:
            self.critic_trainer.load_state_dict(optimizer_state)
        if isinstance(self.previous, SnapshotSource) and "snapshot" in state:
            self.previous.load(state["snapshot"])
