"""DRG, DSR and DRG+DSR: lightweight self-KD with multi-source information fusion.

Wang, Han, Guo, "Lightweight Self-Knowledge Distillation with Multi-source Information Fusion"
(papers/drg-dsr.md, section IV, eqs. (8)-(13)); official code xucong-parsifal/LightSKD @b3a3bf9
(not runnable as released; research/official-code-notes.md §7). SPEC §5.

Formulas (``z`` main-head logits, ``z'`` auxiliary-classifier logits, ``z̃`` a row of logits
sorted ascending, ``p(τ) = softmax(·/τ)``, KL batch-mean, ``sg`` = stop-gradient; the losses are
in :mod:`selfkd.losses.drg`)::

    DRG      L = L_HL + α·L_RG
             L_HL = CE(z, y) + CE(z', y)                       eq. (8)
             L_RG = τ_drg²·KL(sg(p(z')(τ_drg)) ‖ p(z)(τ_drg))  eq. (9)  the AC teaches the main head
    DSR      L = CE(z, y) + β·L_SR                             eq. (12)
             L_SR = τ_dsr²·KL(p(sg(z̃_{t−1}))(τ_dsr) ‖ p(z̃_t)(τ_dsr))   eq. (11)
    DRG+DSR  L = L_HL + α·L_RG + β·L_SR                        eq. (13)

Defaults: α 0.2, β 1 (paper §V-A and figure 7); τ_drg 1 and τ_dsr 4 (paper figure 6: the best
temperatures of DRG and DSR). The official script hard-codes T = 4 for **both** terms (its
``--temperature`` flag is unused): set ``tau_drg: 4`` to match the code.

Decisions:

- **Auxiliary classifiers (ACs)**: one head per entry of ``taps`` (default ``[stage2]``, the
  paper's "after the second block"; any non-empty subset of ``stage1..stageN``, or module paths,
  as in the paper's table IV; ``tap: X`` is the older one-tap form of ``taps: [X]``), each built
  at setup from its tap's shape measured with a dry forward pass on ``ctx.input_shape`` (eval
  mode, no grad). With several taps every AC adds its CE and teaches the main head with its own
  ``α·L_RG`` term (the paper gives no other weighting)::

      L = CE(z, y) + Σ_j [CE(z'_j, y) + α·τ_drg²·KL(sg(p(z'_j)(τ_drg)) ‖ p(z)(τ_drg))] (+ β·L_SR)

  Terms ``ce_ac`` and ``rg`` are then the sums over taps and ``ce_ac_<tap>``/``rg_<tap>`` each
  tap's own value. The first tap's head is ``self.ac`` (state keys ``ac.*``, as with one tap),
  the others ``self.more_acs[<tap>]``; ``self.acs`` maps every tap to its head.
  Head: ``ac_blocks`` × [conv3×3 stride 2 doubling the channels → BN → ReLU] → global average
  pool → Linear(→K) (:class:`selfkd.methods.heads.AuxiliaryClassifier`). The official head adds
  an attention mask and uses separable convs (SepConv C→2C→4C, stride 2 each); ours keeps its
  depth and widths with plain convs. The stage-2 feature is not detached: the AC's CE gradient
  reaches stages 1-2, as in the paper and code. The AC is an owned module trained by the engine's
  optimizer (:meth:`main_optimizer_modules`), saved in the method's ``state_dict`` and dropped
  at inference (the model's forward is unchanged).
- **DSR pairing**: ``z̃_{t−1}`` are the sorted main-head logits of the previous training step
  (its forward pass, weights before that step's update, a different random batch), stored
  detached after the optimizer step (paper algorithm 2, line 8) and paired with the current
  batch by row position. The first step of every epoch has no previous logits and skips L_SR
  (official code: ``batch_idx == 0``; nothing crosses epoch boundaries); a step skipped by the
  engine for a non-finite loss does not replace the stored logits. When batch sizes differ (a
  last partial batch) both are trimmed to the smaller batch (the official loader drops the last
  batch instead). The term ``sr`` is logged as 0 on steps without L_SR (so its epoch mean is
  diluted by one step in ``steps_per_epoch``). The stored tensor is in the extra state (exact
  resume). ``data.batch_size: 1`` is refused at setup (ConfigError).
- Terms logged (unweighted): ``ce`` (main head), ``ce_ac`` and ``rg`` (DRG), ``sr`` (DSR),
  ``loss`` (the total).
- The official script adds a constant +100 to the loss (no effect on gradients): not done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfkd.errors import ConfigError
from selfkd.losses.drg import drg_dsr_loss, reverse_guidance_loss
from selfkd.methods.base import (
    METHODS,
    Batch,
    Method,
    MethodContext,
    StepInfo,
    StepOutput,
    check_number,
)
from selfkd.methods.heads import AuxiliaryClassifier, open_taps, spatial_shape, tap_shapes
from selfkd.models import FeatureTaps

__all__ = ["DRG", "DRGDSR", "DSR", "DRGDSRParams", "DRGParams", "DSRParams"]

#: the paper's tap: one auxiliary classifier after the second block
DEFAULT_TAPS = ["stage2"]


def _default_taps() -> list[str]:
    return list(DEFAULT_TAPS)


def _key(tap: str) -> str:
    """A tap name as a ModuleDict key (no dots)."""
    return tap.replace(".", "_").replace(":", "_")


def _validate(params: Any) -> None:
    for key in ("alpha", "beta"):
        if hasattr(params, key):
            check_number(key, getattr(params, key), "nonnegative")
    for key in ("tau_drg", "tau_dsr"):
        if hasattr(params, key):
            check_number(key, getattr(params, key), "positive")
    if hasattr(params, "ac_blocks") and params.ac_blocks < 0:
        raise ConfigError(f"method.ac_blocks must be >= 0, got {params.ac_blocks}")
    if hasattr(params, "taps"):
        _resolve_taps(params)


def _resolve_taps(params: Any) -> None:
    """Fold the one-tap form ``tap`` into ``taps`` and check the list (non-empty, no repeats)."""
    if params.tap is not None:
        if not isinstance(params.tap, str) or not params.tap.strip():
            raise ConfigError("method.tap must name a feature tap, e.g. stage2")
        if params.taps not in (DEFAULT_TAPS, [params.tap]):
            raise ConfigError(
                f"method.tap ({params.tap!r}) and method.taps ({params.taps!r}) disagree; "
                "give method.taps only, e.g. taps: [stage1, stage2]"
            )
        params.taps = [params.tap]
        params.tap = None
    taps = params.taps
    if isinstance(taps, str):
        taps = [taps]
    if not isinstance(taps, list) or not taps:
        raise ConfigError(
            f"method.taps must be a non-empty list of feature taps, e.g. [stage2], got {taps!r}"
        )
    for tap in taps:
        if not isinstance(tap, str) or not tap.strip():
            raise ConfigError(f"method.taps must name feature taps, e.g. [stage2], got {tap!r}")
    if len(set(taps)) != len(taps):
        raise ConfigError(f"method.taps lists a tap twice: {taps}; give each tap once")
    params.taps = list(taps)


@dataclass
class DRGParams:
    """Hyper-parameters of DRG (paper defaults; see the module docstring)."""

    alpha: float = 0.2
    tau_drg: float = 1.0
    #: feature taps, one auxiliary classifier each (any non-empty subset of stage1..stageN)
    taps: list[str] = field(default_factory=_default_taps)
    #: the one-tap form of ``taps`` (older configs): ``tap: stage3`` = ``taps: [stage3]``
    tap: str | None = None
    ac_blocks: int = 2

    def validate(self) -> None:
        _validate(self)


@dataclass
class DSRParams:
    """Hyper-parameters of DSR (paper defaults; see the module docstring)."""

    beta: float = 1.0
    tau_dsr: float = 4.0

    def validate(self) -> None:
        _validate(self)


@dataclass
class DRGDSRParams:
    """Hyper-parameters of DRG+DSR (paper defaults; see the module docstring)."""

    alpha: float = 0.2
    beta: float = 1.0
    tau_drg: float = 1.0
    tau_dsr: float = 4.0
    #: feature taps, one auxiliary classifier each (any non-empty subset of stage1..stageN)
    taps: list[str] = field(default_factory=_default_taps)
    #: the one-tap form of ``taps`` (older configs): ``tap: stage3`` = ``taps: [stage3]``
    tap: str | None = None
    ac_blocks: int = 2

    def validate(self) -> None:
        _validate(self)


class _DRGDSRBase(Method):
    """Shared implementation of DRG, DSR and DRG+DSR (selected by ``uses_drg``/``uses_dsr``)."""

    uses_drg: ClassVar[bool] = False
    uses_dsr: ClassVar[bool] = False
    rank_local_extra_state = True  # DSR: each DDP rank pairs with its own previous batch

    ac: AuxiliaryClassifier | None

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        #: the auxiliary classifier of the first tap (state-dict keys ``ac.*``)
        self.ac = None
        #: the auxiliary classifiers of further taps (keys ``more_acs.<tap>.*``)
        self.more_acs = nn.ModuleDict()
        self.taps: FeatureTaps | None = None
        #: sorted main-head logits of the previous step (detached), or None
        self.prev_sorted: Tensor | None = None
        self._device: torch.device | None = None
        self._is_setup = False

    @property
    def acs(self) -> dict[str, AuxiliaryClassifier]:
        """Tap name -> its auxiliary classifier, in ``params.taps`` order (empty before setup)."""
        if self.ac is None:
            return {}
        taps = self.params.taps
        return {taps[0]: self.ac, **{t: self.more_acs[_key(t)] for t in taps[1:]}}

    # --- life cycle -------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        self._device = torch.device(ctx.device)
        if self.uses_dsr and ctx.batch_size is not None and ctx.batch_size < 2:
            raise ConfigError(
                f"method {self.name} pairs each sample's sorted logits with another sample "
                f"of the previous batch and needs data.batch_size >= 2, got {ctx.batch_size}"
            )
        if self.uses_drg:
            taps = self.params.taps
            if self.taps is not None:
                self.taps.remove()
            self.taps = open_taps(self.name, model, taps)
            shapes = tap_shapes(model, self.taps, ctx.input_shape)
            heads = {}
            for tap in taps:
                channels, _, _ = spatial_shape(self.name, tap, shapes[tap])
                heads[tap] = AuxiliaryClassifier(
                    channels, ctx.num_classes, self.params.ac_blocks
                ).to(self._device)
            self.ac = heads[taps[0]]
            self.more_acs = nn.ModuleDict({_key(t): heads[t] for t in taps[1:]})
        self._is_setup = True

    def main_optimizer_modules(self) -> list[nn.Module]:
        return list(self.acs.values())

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        # nothing crosses epoch boundaries: the first step of an epoch skips L_SR
        self.prev_sorted = None

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        if not self._is_setup:
            raise RuntimeError(f"{type(self).__name__}.setup(model, ctx) must be called first")
        logits = model(batch.inputs)
        ac_logits: dict[str, Tensor] = {}
        if self.uses_drg:
            assert self.taps is not None and self.ac is not None
            features = {tap: self.taps[tap] for tap in self.params.taps}
            self.taps.clear()
            ac_logits = {tap: head(features[tap]) for tap, head in self.acs.items()}
        prev = None
        if self.uses_dsr and info.step > 0 and self.prev_sorted is not None:
            prev = self.prev_sorted.to(logits.device)
        heads = list(ac_logits.items())
        p = self.params
        alpha, tau_drg = (p.alpha, p.tau_drg) if self.uses_drg else (0.0, 1.0)
        beta, tau_dsr = (p.beta, p.tau_dsr) if self.uses_dsr else (0.0, 4.0)
        loss, terms = drg_dsr_loss(
            logits,
            batch.targets,
            heads[0][1] if heads else None,
            prev,
            alpha=alpha,
            beta=beta,
            tau_drg=tau_drg,
            tau_dsr=tau_dsr,
        )
        if len(heads) > 1:  # each further AC adds its CE and teaches the main head (eq. (8)-(10))
            first = heads[0][0]
            terms[f"ce_ac_{first}"], terms[f"rg_{first}"] = terms["ce_ac"], terms["rg"]
            for tap, z_ac in heads[1:]:
                ce_ac = F.cross_entropy(z_ac.float(), batch.targets)
                rg = reverse_guidance_loss(logits, z_ac, tau_drg)
                loss = loss + ce_ac + alpha * rg
                terms[f"ce_ac_{tap}"], terms[f"rg_{tap}"] = ce_ac.detach(), rg.detach()
                terms["ce_ac"] = terms["ce_ac"] + ce_ac.detach()
                terms["rg"] = terms["rg"] + rg.detach()
        if self.uses_dsr and "sr" not in terms:
            terms["sr"] = torch.zeros((), device=logits.device)
        terms["loss"] = loss.detach()
        return StepOutput(loss=loss, logits=logits, targets=batch.targets, terms=terms)

    def after_optimizer_step(self, model: nn.Module, batch: Batch, out: StepOutput) -> None:
        # algorithm 2, line 8: store z̃_t (pre-update forward) for the next iteration
        if self.uses_dsr:
            self.prev_sorted = torch.sort(out.logits.detach().float(), dim=1).values

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if described.get("tap") is None:  # folded into taps by validate()
            described.pop("tap", None)
        return described

    # --- state ------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        if not self.uses_dsr:
            return {}
        prev = None if self.prev_sorted is None else self.prev_sorted.detach().clone()
        return {"version": 1, "prev_sorted": prev}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or not self.uses_dsr:
            return
        prev = state.get("prev_sorted")
        if isinstance(prev, Tensor):
            prev = prev.detach().clone()
            if self._device is not None:
                prev = prev.to(self._device)
        self.prev_sorted = prev


@METHODS.register("drg")
class DRG(_DRGDSRBase):
    """DRG: an auxiliary classifier on stage 2 teaches the main head (reverse guidance)."""

    name = "drg"
    Params = DRGParams
    uses_drg = True


@METHODS.register("dsr")
class DSR(_DRGDSRBase):
    """DSR: match the sorted logit profile of the previous iteration (shape regularization)."""

    name = "dsr"
    Params = DSRParams
    uses_dsr = True


@METHODS.register("drg_dsr", "drg+dsr", "drg-dsr")
class DRGDSR(_DRGDSRBase):
    """DRG+DSR: stage-2 auxiliary-classifier guidance plus sorted-logit shape regularization."""

    name = "drg_dsr"
    Params = DRGDSRParams
    uses_drg = True
    uses_dsr = True
