"""BYOT: Be Your Own Teacher (Zhang et al., ICCV 2019), early exits taught by the deepest one.

Zhang, Song, Gao, Chen, Bao, Ma, "Be Your Own Teacher: Improve the Performance of Convolutional
Neural Networks via Self Distillation", ICCV 2019. No ICCV-version code was released; read were
the author's journal-version code (ArchipLab-LinfengZhang/pytorch-self-distillation-final) and an
unofficial re-implementation (luanyunteng/pytorch-be-your-own-teacher); see
research/official-code-notes.md §5 and SPEC §6.

An exit (a bottleneck conv head + pooling + FC) is attached after every stage except the last
(taps ``stage1..stage{N−1}``); the deepest classifier C is the model's own output. With ``i``
ranging over the shallow exits (:func:`selfkd.losses.byot.byot_loss`)::

    L = (1−α)·[CE(z_C, y) + Σ_i CE(z_i, y)]
        + α·Σ_i T²·KL(sg(p_C(T)) ‖ p_i(T))
        + λ·Σ_i mean_b ‖f_i − sg(f_C)‖²

Defaults: α 0.3, T 3, λ 0.03, the journal code's values (the ICCV hyper-parameters were never
released; the unofficial repo uses α 0.1, λ 1e-6, T 3).

Decisions:

- **Loss form**: the ICCV paper's per-classifier loss ``(1−α)·CE + α·KL + λ·‖F_i − F_C‖²``
  summed over all classifiers (the deepest has no KL or feature term, so its CE also carries
  1−α). The journal code differs: weight 1 on the deepest CE, soft cross-entropy without T²,
  a non-squared whole-batch L2 ``torch.dist`` through lazily created linear adapters, and a
  feature term that skips the 3/4 exit. We use the squared L2 distance of each sample's pooled
  features, averaged over the batch, on every shallow exit.
- **Exit heads** (:class:`selfkd.methods.heads.BottleneckExit`, the unofficial repo's
  "branchBottleNeck"): conv1×1 (→D/4) → BN → ReLU → conv k×k stride k → BN → ReLU → conv1×1
  (→D) → BN → ReLU → global average pool → Linear(D→K), where D is the width of the deepest
  pooled feature (tap ``pooled``), so no adapter is needed, and k is the ratio of the exit's
  spatial size to that of the final feature map (tap ``features``). The journal code's
  attention masks and SepConv chains are not used. Shapes are measured at setup by a dry forward
  pass on ``ctx.input_shape`` (eval mode, no grad).
- The exits' features are not detached: their gradients reach the backbone stages (that is the
  point of BYOT); the deepest logits and pooled feature are detached as teachers but get CE.
- The exits are owned modules trained by the engine's optimizer (:meth:`main_optimizer_modules`),
  saved in the method's ``state_dict`` and unused at inference: evaluation scores the deepest
  classifier only (the papers' exit ensemble is not reported).
- ``exit_taps`` (default: all stage taps but the last) may list other taps or module paths;
  ``features_tap``/``pooled_tap`` name the final map and pooled feature, for models without the
  standard taps.
- Terms logged (unweighted): ``ce_deep``, ``ce_exits`` (sum over exits), ``kd_exits`` (sum),
  ``feature`` (sum; absent when λ = 0), ``loss``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from selfkd.errors import ConfigError, ModelError
from selfkd.losses.byot import byot_loss
from selfkd.methods.base import (
    METHODS,
    Batch,
    Method,
    MethodContext,
    StepInfo,
    StepOutput,
    check_number,
)
from selfkd.methods.heads import (
    BottleneckExit,
    exit_kernel,
    open_taps,
    spatial_shape,
    tap_shapes,
)
from selfkd.models import FeatureTaps, available_taps

__all__ = ["BYOT", "BYOTParams", "default_exit_taps"]

_STAGE = re.compile(r"stage(\d+)$")


def default_exit_taps(model: nn.Module) -> list[str]:
    """``stage1..stage{N−1}`` of a model whose taps include ``stage1..stageN`` (N >= 2)."""
    stages = sorted(int(m.group(1)) for n in available_taps(model) if (m := _STAGE.match(n)))
    if len(stages) < 2 or stages != list(range(1, len(stages) + 1)):
        found = ", ".join(f"stage{s}" for s in stages) or "none"
        raise ModelError(
            f"method byot needs feature taps stage1..stageN (N >= 2) on model "
            f"{type(model).__name__}, found {found}; set method.exit_taps to module paths"
        )
    return [f"stage{s}" for s in stages[:-1]]


@dataclass
class BYOTParams:
    """Hyper-parameters of BYOT (journal-code defaults; see the module docstring)."""

    alpha: float = 0.3
    temperature: float = 3.0
    feature_weight: float = 0.03
    exit_taps: list[str] = field(default_factory=list)
    features_tap: str = "features"
    pooled_tap: str = "pooled"

    def validate(self) -> None:
        check_number("alpha", self.alpha, "unit")
        check_number("temperature", self.temperature, "positive")
        check_number("feature_weight", self.feature_weight, "nonnegative")
        if len(set(self.exit_taps)) != len(self.exit_taps):
            raise ConfigError(f"method.exit_taps has duplicates: {self.exit_taps}")
        for key in ("features_tap", "pooled_tap"):
            if not getattr(self, key).strip():
                raise ConfigError(f"method.{key} must name a feature tap")


@METHODS.register("byot", "be-your-own-teacher")
class BYOT(Method):
    """BYOT: exits after every stage learn from labels, the deepest output and its features."""

    name = "byot"
    Params = BYOTParams

    def __init__(self, params: BYOTParams | None = None) -> None:
        super().__init__(params)
        self.exits = nn.ModuleList()
        self.exit_taps: list[str] = []
        self.taps: FeatureTaps | None = None
        self._is_setup = False

    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        p: BYOTParams = self.params
        self.exit_taps = list(p.exit_taps) or default_exit_taps(model)
        if p.pooled_tap in self.exit_taps or p.features_tap in self.exit_taps:
            raise ConfigError(
                f"method byot: exit_taps {self.exit_taps} must not contain the deepest taps "
                f"{p.features_tap!r}/{p.pooled_tap!r}"
            )
        if self.taps is not None:
            self.taps.remove()
        names = [*self.exit_taps, p.features_tap, p.pooled_tap]
        self.taps = open_taps(self.name, model, names)
        shapes = tap_shapes(model, self.taps, ctx.input_shape)
        _, fh, fw = spatial_shape(self.name, p.features_tap, shapes[p.features_tap])
        pooled = shapes[p.pooled_tap]
        width = math.prod(pooled)
        if len(pooled) not in (1, 3) or (len(pooled) == 3 and pooled[1:] != (1, 1)):
            raise ModelError(
                f"method byot needs a pooled feature vector at tap {p.pooled_tap!r}, got "
                f"per-sample shape {pooled}"
            )
        exits = []
        for tap in self.exit_taps:
            c, h, w = spatial_shape(self.name, tap, shapes[tap])
            kernel = exit_kernel((h, w), (fh, fw))
            exits.append(BottleneckExit(c, width, ctx.num_classes, kernel))
        self.exits = nn.ModuleList(exits).to(torch.device(ctx.device))
        self._is_setup = True

    def main_optimizer_modules(self) -> list[nn.Module]:
        return [self.exits]

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        if not self._is_setup:
            raise RuntimeError("BYOT.setup(model, ctx) must be called before training_step")
        p: BYOTParams = self.params
        taps = self.taps
        assert taps is not None
        logits = model(batch.inputs)
        deep_feature = taps[p.pooled_tap].flatten(1)
        exit_logits: list[Tensor] = []
        exit_features: list[Tensor] = []
        for tap, head in zip(self.exit_taps, self.exits, strict=True):
            z, f = head(taps[tap])
            exit_logits.append(z)
            exit_features.append(f)
        taps.clear()
        loss, terms = byot_loss(
            logits,
            exit_logits,
            batch.targets,
            deep_feature,
            exit_features,
            alpha=p.alpha,
            temperature=p.temperature,
            feature_weight=p.feature_weight,
        )
        terms["loss"] = loss.detach()
        return StepOutput(loss=loss, logits=logits, targets=batch.targets, terms=terms)
