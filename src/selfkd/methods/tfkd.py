"""TF-KD: Teacher-free knowledge distillation, self-training (``tfkd_self``) and virtual
teacher (``tfkd_reg``).

Yuan, Tay, Li, Wang, Feng, "Revisiting Knowledge Distillation via Label Smoothing
Regularization", CVPR 2020; official code yuanli2333/Teacher-free-Knowledge-Distillation
@d000ab3 (SPEC §4, research/official-code-notes.md §3). Losses in
:mod:`selfkd.losses.smoothing`.

``tfkd_self`` (Tf-KD_self, official ``loss_kd_self``)::

    L = (1−α)·CE(z, y) + w·T²·KL_bm(softmax(z_teacher/T) ‖ softmax(z/T))

The teacher is a trained model of the same architecture: ``teacher`` is a phase-1 checkpoint
path or ``auto`` (the engine trains or reuses the plain-CE phase-1 run, exactly as for AI-KD's
superior model). It stays frozen in eval mode and runs under ``no_grad`` on the same augmented
batch as the student. Defaults: the official CIFAR-100 ResNet-18 config α 0.95, T 6, m 50.

``tfkd_reg`` (Tf-KD_reg, official ``loss_kd_regularization``; no teacher network)::

    L = (1−α)·CE(z, y) + w·KL_bm(q ‖ softmax(z)),   q = softmax(u/T),
    u_y = a,  u_k = (1−a)/(K−1) for k ≠ y

Defaults: the official CIFAR-100 ResNet-18 config α 0.1, T 20, m 100, a 0.99.

The KD weight ``w`` (both methods). The official code computes its KL with
``nn.KLDivLoss()``, whose default ``'mean'`` reduction divides by B·K instead of B (KL_code =
KL_bm/K), and multiplies it by α and a per-config ``multiplier`` m. In batchmean terms its weight
is therefore ``w = α·m/K``. We express the loss with KL_bm and compute ``w = α·m/K`` at
:meth:`setup` from the dataset's K (``multiplier`` = the official m), unless ``kd_weight`` is
given, which then sets w directly (α still scales the CE). At K = 100: ``tfkd_self`` w = 0.475,
i.e. 0.475·36 = 17.1 on KL_bm (the "effective 17.1" of the notes); ``tfkd_reg`` w = 0.1, i.e.
0.9·CE + 0.1·KL_bm. On another K the official m gives another w (as the official code would);
set ``kd_weight`` to keep a fixed batchmean weight instead.

Decisions:

- ``tfkd_reg`` implements the **official** teacher: u (already a probability vector) is fed to
  softmax as logits with temperature T, which makes q nearly uniform (K = 100, T = 20:
  q_y = 0.01050, q_k = 0.009995), so the KD term is in effect a uniform label smoothing of weight
  w. The student is not softened (T = 1 on z). The paper's text softens both sides; we follow
  the code that produced the published numbers.
- The tfkd_self teacher is held outside the method's parameters and ``state_dict`` (a plain
  dict, like AI-KD's superior): it is rebuilt from the checkpoint path at setup, and
  ``method.train()`` does not take it out of eval mode.
- Terms logged: ``ce`` and ``kd`` (unweighted: ``T²·KL_bm`` for self, ``KL_bm`` for reg; absent
  when w = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from selfkd.errors import ConfigError
from selfkd.losses.smoothing import tfkd_kd_weight, tfkd_reg_loss, tfkd_self_loss
from selfkd.methods.base import (
    METHODS,
    Batch,
    Method,
    MethodContext,
    StepInfo,
    StepOutput,
    check_number,
    frozen_forward,
)

__all__ = ["TFKDReg", "TFKDRegParams", "TFKDSelf", "TFKDSelfParams"]


def _check_common(params: Any) -> None:
    """Checks shared by both TF-KD variants; ConfigError naming the key."""
    check_number("alpha", params.alpha, "unit")
    check_number("temperature", params.temperature, "positive")
    check_number("multiplier", params.multiplier, "nonnegative")
    if params.kd_weight is not None:
        check_number("kd_weight", params.kd_weight, "nonnegative")


def _resolve_weight(params: Any, num_classes: int) -> float:
    """The batchmean KD weight: ``kd_weight`` if given, else the official ``α·m/K``."""
    if params.kd_weight is not None:
        return float(params.kd_weight)
    return tfkd_kd_weight(params.alpha, params.multiplier, num_classes)


@dataclass
class TFKDSelfParams:
    """Hyper-parameters of TF-KD self-training (official CIFAR-100 ResNet-18 defaults)."""

    alpha: float = 0.95
    temperature: float = 6.0
    multiplier: float = 50.0
    kd_weight: float | None = None
    teacher: str = "auto"

    def validate(self) -> None:
        _check_common(self)
        if not isinstance(self.teacher, str) or not self.teacher.strip():
            raise ConfigError("method.teacher must be 'auto' or a checkpoint path")

    def kd_is_off(self) -> bool:
        """True when the KD weight is 0 whatever K is (then no teacher is needed)."""
        if self.kd_weight is not None:
            return self.kd_weight == 0
        return self.alpha == 0 or self.multiplier == 0


@dataclass
class TFKDRegParams:
    """Hyper-parameters of TF-KD's virtual teacher (official CIFAR-100 ResNet-18 defaults)."""

    alpha: float = 0.1
    temperature: float = 20.0
    multiplier: float = 100.0
    kd_weight: float | None = None
    correct_prob: float = 0.99

    def validate(self) -> None:
        _check_common(self)
        check_number("correct_prob", self.correct_prob, "unit")


@METHODS.register("tfkd_self", "tf-kd-self", "tfkd-self")
class TFKDSelf(Method):
    """TF-KD self-training (Yuan et al. 2020): KD from a trained same-architecture teacher."""

    name = "tfkd_self"
    Params = TFKDSelfParams
    teacher_param = "teacher"

    def __init__(self, params: TFKDSelfParams | None = None) -> None:
        super().__init__(params)
        #: the batchmean weight of T²·KL_bm, resolved at setup (α·m/K unless kd_weight is set)
        self.kd_weight: float | None = None

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (held: eval mode, outside ``state_dict``), or None before setup or
        when KD is off."""
        return self.held("teacher")

    def needs_teacher(self) -> bool:
        return not self.params.kd_is_off()

    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        p: TFKDSelfParams = self.params
        self.kd_weight = _resolve_weight(p, ctx.num_classes)
        if self.kd_weight > 0:
            if p.teacher == "auto":
                raise ConfigError(
                    "method tfkd_self: method.teacher is 'auto' but no phase-1 checkpoint was "
                    "resolved before setup; give a checkpoint path or let the engine train phase 1"
                )
            self.hold("teacher", ctx.load_model(p.teacher).to(ctx.device))

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        if self.kd_weight is None:
            raise RuntimeError("TFKDSelf.setup(model, ctx) must be called before training_step")
        p: TFKDSelfParams = self.params
        logits = model(batch.inputs)
        teacher_logits = logits  # unused when the KD weight is 0
        teacher = self.held("teacher")
        if self.kd_weight > 0:
            assert teacher is not None
            teacher_logits = frozen_forward(teacher, batch.inputs, logits, "teacher", self.name)
        loss, terms = tfkd_self_loss(
            logits,
            batch.targets,
            teacher_logits,
            alpha=p.alpha,
            temperature=p.temperature,
            kd_weight=self.kd_weight,
        )
        return StepOutput(loss=loss, logits=logits, targets=batch.targets, terms=terms)


@METHODS.register("tfkd_reg", "tf-kd-reg", "tfkd-reg")
class TFKDReg(Method):
    """TF-KD virtual teacher (Yuan et al. 2020): KD from a hand-made, nearly uniform teacher."""

    name = "tfkd_reg"
    Params = TFKDRegParams

    def __init__(self, params: TFKDRegParams | None = None) -> None:
        super().__init__(params)
        #: the batchmean weight of KL_bm, resolved at setup (α·m/K unless kd_weight is set)
        self.kd_weight: float | None = None

    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        if ctx.num_classes < 2:
            raise ConfigError(
                f"method tfkd_reg needs at least 2 classes for its virtual teacher, the data has "
                f"{ctx.num_classes}"
            )
        self.kd_weight = _resolve_weight(self.params, ctx.num_classes)

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        if self.kd_weight is None:
            raise RuntimeError("TFKDReg.setup(model, ctx) must be called before training_step")
        p: TFKDRegParams = self.params
        logits = model(batch.inputs)
        loss, terms = tfkd_reg_loss(
            logits,
            batch.targets,
            alpha=p.alpha,
            temperature=p.temperature,
            kd_weight=self.kd_weight,
            correct_prob=p.correct_prob,
        )
        return StepOutput(loss=loss, logits=logits, targets=batch.targets, terms=terms)
