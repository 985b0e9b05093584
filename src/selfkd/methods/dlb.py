"""DLB: self-distillation from the last mini-batch.

Shen, Liu, Cao, Zhang, Wei, Ji, "Self-Distillation from the Last Mini-Batch for Consistency
Regularization", CVPR 2022; official code Meta-knowledge-Lab/DLB @8949a46 (SPEC §6,
research/official-code-notes.md §4).

Step t, batch D_t (view 0 = ``batch.inputs``) and the previous batch D_{t−1} re-augmented from
its saved raw images (view 1 = ``batch.augment(raw_{t−1})``), both forwarded with the current
weights::

    L = CE([z_t; z'_{t−1}], [y_t; y_{t−1}])
        + α · τ² · KL(softmax(sg(z_{t−1})/τ) ‖ softmax(z'_{t−1}/τ))

where z_{t−1} are batch t−1's view-0 logits saved at step t−1 (pre-update weights) and CE is the
mean over all samples of both halves. Defaults (``DLBParams``): τ = 3, α = 1 (paper; the official
dlb.py has no defaults, its experiment suffix ``TP3`` hints at τ = 3).

Decisions:

- **One forward** of the concatenated batch ``[view 0 of D_t; view 1 of D_{t−1}]`` (2·B images):
  BatchNorm sees both halves together (the official code runs two forwards of B images).
- Views: the engine's augmentation draws view 0; view 1 is a fresh ``batch.augment`` of the raw
  images saved at step t−1, so the two views are independent draws of the same augmentation
  (the official loader draws two views per image). Datasets augmented in the loader (file
  datasets: ``augment`` is the identity) get view 1 = view 0.
- **State** (on the device): raw images, targets and detached view-0 logits of the last batch,
  written in :meth:`DLB.after_optimizer_step` (so a step skipped for a non-finite loss does not
  replace them: the following step distils the older batch again). The state crosses epoch
  boundaries (the last batch of epoch e is distilled at the first step of e+1) and is saved in
  the checkpoint (``get_extra_state``; raw uint8 images as they came), so a resumed run is
  exact.
- First step of the run: CE on the current batch only (term ``dlb_kd`` = 0).
- ``StepOutput.logits/targets`` are batch t's view-0 half (each sample counted once per epoch).
- ``data.batch_size`` 1 raises :class:`~selfkd.errors.ConfigError`.
- Terms: ``ce`` (over both halves), ``dlb_kd`` (unweighted, τ²-scaled), ``loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from selfkd.errors import ConfigError
from selfkd.losses.dlb import dlb_loss
from selfkd.methods.base import (
    METHODS,
    Batch,
    Method,
    MethodContext,
    StepInfo,
    StepOutput,
    check_number,
)

__all__ = ["DLB", "DLBParams"]

_STATE_KEYS = ("raw", "targets", "logits")


@dataclass
class DLBParams:
    """Hyper-parameters of DLB (paper defaults)."""

    tau: float = 3.0
    alpha: float = 1.0

    def validate(self) -> None:
        check_number("tau", self.tau, "positive", "dlb")
        check_number("alpha", self.alpha, "nonnegative", "dlb")


@METHODS.register("dlb")
class DLB(Method):
    """DLB: distil the last mini-batch's predictions into a new view of it, τ²·KL at τ=3."""

    name = "dlb"
    Params = DLBParams
    rank_local_extra_state = True  # each DDP rank distils its own previous batch

    def __init__(self, params: DLBParams | None = None) -> None:
        super().__init__(params)
        #: the last batch: raw images, targets and detached view-0 logits (None before step 1)
        self.prev: dict[str, Tensor] | None = None
        self._device: torch.device | None = None

    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        self._device = torch.device(ctx.device)
        if ctx.batch_size == 1:
            raise ConfigError(
                "dlb needs data.batch_size >= 2 (it distils whole mini-batches into the next "
                "step); raise data.batch_size"
            )
        if self.prev is not None:
            self.prev = {k: v.to(self._device) for k, v in self.prev.items()}

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        p: DLBParams = self.params
        n = batch.inputs.shape[0]
        prev = self.prev
        if prev is None:
            logits = model(batch.inputs)
            loss, terms = dlb_loss(logits, batch.targets, tau=p.tau, alpha=p.alpha)
        else:
            raw = prev["raw"].to(batch.inputs.device)
            view1 = batch.augment(raw).to(dtype=batch.inputs.dtype)
            if batch.inputs.is_contiguous(memory_format=torch.channels_last) and view1.dim() == 4:
                view1 = view1.contiguous(memory_format=torch.channels_last)
            both = model(torch.cat([batch.inputs, view1]))
            logits, prev_logits = both[:n], both[n:]
            loss, terms = dlb_loss(
                logits,
                batch.targets,
                prev_logits,
                prev["targets"].to(batch.targets.device),
                prev["logits"].to(prev_logits.device),
                tau=p.tau,
                alpha=p.alpha,
            )
        return StepOutput(
            loss=loss, logits=logits, targets=batch.targets, terms={**terms, "loss": loss.detach()}
        )

    def after_optimizer_step(self, model: nn.Module, batch: Batch, out: StepOutput) -> None:
        # batch t (raw images, labels, pre-update view-0 logits) becomes next step's D_{t-1}
        self.prev = {
            "raw": batch.raw.detach(),
            "targets": batch.targets.detach(),
            "logits": out.logits.detach().float(),
        }

    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"version": 1}
        if self.prev is not None:
            state["prev"] = {k: self.prev[k] for k in _STATE_KEYS}
        return state

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            return
        prev = state.get("prev")
        if prev is None:
            self.prev = None
            return
        missing = [k for k in _STATE_KEYS if k not in prev]
        if missing:
            raise ConfigError(f"dlb: saved state lacks {', '.join(missing)}")
        self.prev = {
            k: (prev[k].to(self._device) if self._device is not None else prev[k])
            for k in _STATE_KEYS
        }
