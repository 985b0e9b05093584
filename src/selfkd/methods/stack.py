"""Stacked methods: several self-KD methods on one student forward (``method: {name: stack}``).

The DRG/DSR paper's table III puts DRG, DSR and DRG+DSR on top of PS-KD (and of Cutout); a
stack runs any such combination::

    method:
      name: stack
      parts:                 # a mapping, part name -> its own hyper-parameters (or a list of
        pskd: {}             #   {name: ..., **params} entries, or of names)
        drg: {alpha: 0.2, taps: [stage2]}

``--set method.parts.drg.alpha=0.5`` sets one part's parameter. Without ``parts`` a stack is
PS-KD + DRG with their defaults.

Loss. Every part computes its own loss on the **same** logits (one forward of the student per
step), and each part's loss holds the main head's hard-label cross-entropy once (DRG's and DSR's
``CE(z, y)``), or a target loss that takes its place (PS-KD's soft-target CE, label smoothing,
TF-KD's ``(1−α)·CE + α·KL``). The stack counts that CE once::

    L_stack = Σ_i L_i − (n − 1)·CE(z, y)

i.e. one part keeps its full loss and every other part adds its loss minus CE: PS-KD + DRG is
``L_PSKD + CE(z', y) + α·L_RG`` (PS-KD's target replaces the hard label, the auxiliary head adds
its CE and its guidance, the paper's table III reading of "PS-KD + DRG"); DRG + DSR is
``L_HL + α·L_RG + β·L_SR``, eq. (13). Two target-replacing parts (PS-KD with α_t and label
smoothing with ε) give the linear mix of their targets, ``(1−α_t−ε)·onehot + α_t·p_{t−1} +
ε·u``. Under ``data.mix`` the CE subtracted is the hard-label CE the parts use for the batch as it
was mixed (:func:`selfkd.losses.mixing.mixed_ce` over the whole batch: λ·CE(z, y) + (1−λ)·CE(z,
y[π]) on mixed rows, the plain CE elsewhere; Cutout rows keep λ = 1).

Mixing composes as for single methods: the stack takes the split rule when any part does (PS-KD:
half the batch cut or mixed, half with the parts' own targets), the whole batch when all parts do,
and Mixup/CutMix are refused (ConfigError naming the part) when a part has no loss for mixed
labels (DRG, DSR: Cutout only, which changes no label).

Refused parts (one-line ConfigError naming the part and why): methods that draw their own
batches (CS-KD's class pairs, any part with a ``batch_sampler``), forward something else than the
batch (DLB's two views), need a phase-1 model (TF-KD-self's teacher), AI-KD (its critic trains
with its own optimizer inside its step and its superior is a phase-1 model), a stack inside a
stack, a part given twice, and stacks of fewer than two parts. A part that still calls the model
on another input at run time stops the run with the same kind of error.

State: the parts are submodules (``parts.<name>.*`` in the state dict: PS-KD's bank, DRG's
auxiliary heads, DSR's previous logits as each part's extra state), so checkpoints keep every
part's state and a resume restores it exactly. Terms are logged per part as ``<part>/<term>``
(and ``<part>/loss``, the part's own loss) plus ``ce``, the CE counted once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from selfkd.errors import ConfigError
from selfkd.losses.mixing import mixed_ce
from selfkd.methods.base import (
    METHODS,
    Batch,
    Method,
    MethodContext,
    StepInfo,
    StepOutput,
    build_method,
    parse_params,
)

__all__ = ["REFUSED", "Stack", "StackParams", "normalize_parts"]

#: parts that cannot share the student's forward or sampler: canonical name -> reason
REFUSED: dict[str, str] = {
    "cskd": "CS-KD draws its own batches (anchor/same-class pairs) and forwards the pairs too",
    "dlb": "DLB forwards two views (this batch and a new view of the last one), "
    "not the shared batch",
    "aikd": "AI-KD trains its critic with its own optimizer inside its step and learns from a "
    "phase-1 superior; a stack trains in one phase (stack pskd for its progressive part)",
    "stack": "a stack cannot hold a stack; list all parts in one stack",
}


def _part_entries(parts: Any) -> list[tuple[str, dict[str, Any]]]:
    """(name as written, params) pairs from the mapping or list forms of ``method.parts``."""
    if isinstance(parts, dict):
        entries = []
        for name, params in parts.items():
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise ConfigError(
                    f"method.parts.{name} must be a mapping of that method's parameters "
                    f"(e.g. {name}: {{}}), got {params!r}"
                )
            if "name" in params:
                raise ConfigError(
                    f"method.parts.{name} must not hold a 'name' (the key names the part)"
                )
            entries.append((str(name), dict(params)))
        return entries
    if isinstance(parts, list):
        entries = []
        for i, entry in enumerate(parts):
            if isinstance(entry, str):
                entries.append((entry, {}))
            elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
                entries.append((entry["name"], {k: v for k, v in entry.items() if k != "name"}))
            else:
                raise ConfigError(
                    f"method.parts[{i}] must be a method name or a mapping with a 'name', "
                    f"got {entry!r}"
                )
        return entries
    raise ConfigError(
        "method.parts must list the stacked methods, e.g. parts: {pskd: {}, drg: {alpha: 0.2}}"
    )


def _refusal(name: str, method_cls: type[Method], params: Any) -> str | None:
    """Why part ``name`` cannot join a stack, or None."""
    if method_cls.batch_sampler is not Method.batch_sampler:
        return f"{name} draws its own batches, which the other parts cannot share"
    if method_cls.teacher_param is not None and method_cls(params).needs_teacher():
        return (
            f"{name} learns from a phase-1 model (method.{method_cls.teacher_param}); "
            "a stack trains in one phase"
        )
    return None


def normalize_parts(parts: Any) -> dict[str, dict[str, Any]]:
    """``method.parts`` as {canonical name: validated params dict}; ConfigError on bad input."""
    from dataclasses import asdict

    entries = _part_entries(parts)
    if len(entries) < 2:
        raise ConfigError(
            f"method stack needs at least two parts, got {len(entries)}; "
            "use method: {name: <method>} for one method"
        )
    out: dict[str, dict[str, Any]] = {}
    for written, values in entries:
        name = METHODS.canonical(written)
        if name in out:
            raise ConfigError(f"method stack: part {name} is given twice; give each part once")
        method_cls = METHODS.get(name)
        if name in REFUSED:
            raise ConfigError(f"method stack cannot take part {name}: {REFUSED[name]}")
        try:
            params = parse_params(method_cls, values)
        except ConfigError as exc:
            raise ConfigError(f"method stack, part {name}: {exc}") from None
        reason = _refusal(name, method_cls, params)
        if reason is not None:
            raise ConfigError(f"method stack cannot take part {name}: {reason}")
        out[name] = asdict(params)
    return out


def _default_parts() -> dict[str, dict[str, Any]]:
    return {"pskd": {}, "drg": {}}


@dataclass
class StackParams:
    """The stacked parts: ``{name: params}`` (or a list of ``{name: ..., **params}``); by
    default PS-KD + DRG, the first stacked row of the DRG/DSR paper's table III."""

    parts: Any = field(default_factory=_default_parts)

    def validate(self) -> None:
        self.parts = normalize_parts(self.parts)


class _SharedForward(nn.Module):
    """The student as the parts see it: its forward on the step's batch runs once and every
    later call with that batch returns the same logits (same graph); any other input is refused.

    ``module`` is the real (possibly DDP- or compile-wrapped) model, so ``unwrap_model`` and
    feature taps reach it.
    """

    def __init__(self, model: nn.Module, inputs: Tensor) -> None:
        super().__init__()
        self.module = model
        self.training = model.training
        self._inputs = inputs
        self._logits: Tensor | None = None
        self.part = ""

    def forward(self, x: Tensor) -> Tensor:
        if x is not self._inputs:
            raise ConfigError(
                f"method stack: part {self.part} forwards an input other than the step's batch "
                "and cannot share the student's forward; drop it from the stack"
            )
        if self._logits is None:
            self._logits = self.module(x)
        return self._logits


@METHODS.register("stack")
class Stack(Method):
    """Several self-KD methods summed on one student forward, CE counted once."""

    name = "stack"
    Params = StackParams

    parts: nn.ModuleDict

    def __init__(self, params: StackParams | None = None) -> None:
        super().__init__(params)
        built = {name: build_method({"name": name, **v}) for name, v in self.params.parts.items()}
        self.parts = nn.ModuleDict(built)
        #: each part's StepOutput of the current step, for its after_optimizer_step
        self._outs: dict[str, StepOutput] = {}
        modes = [part.mixing for part in self.parts.values()]
        # instance attributes: what the engine reads for data.mix and DDP state
        self.mixing = (
            "split" if "split" in modes else ("full" if set(modes) == {"full"} else "none")
        )
        self.rank_local_extra_state = any(p.rank_local_extra_state for p in self.parts.values())

    # --- the engine's hooks, forwarded to every part -----------------------------------------
    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        # every part gets the same context: its DDP hooks (gather, reduce_grads) included
        if ctx.mix is not None and ctx.mix.changes_labels:
            for name, part in self.parts.items():
                if part.mixing == "none":
                    raise ConfigError(
                        f"method stack: part {name} cannot take data.mix={ctx.mix.name} (it has "
                        "no loss for mixed labels); use cutout, drop data.mix or drop the part"
                    )
        for part in self.parts.values():
            part.setup(model, ctx)

    def main_optimizer_modules(self) -> list[nn.Module]:
        return [m for part in self.parts.values() for m in part.main_optimizer_modules()]

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        for part in self.parts.values():
            part.on_epoch_start(model, epoch)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        for part in self.parts.values():
            part.on_epoch_end(model, epoch)

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        shared = _SharedForward(model, batch.inputs)
        outs: dict[str, StepOutput] = {}
        terms: dict[str, Tensor] = {}
        total: Tensor | None = None
        for name, part in self.parts.items():
            shared.part = name
            out = part.training_step(shared, batch, info)
            outs[name] = out
            total = out.loss.float() if total is None else total + out.loss.float()
            terms[f"{name}/loss"] = out.loss.detach()
            for key, value in out.terms.items():
                if key != "loss":
                    terms[f"{name}/{key}"] = value
        assert total is not None and shared._logits is not None
        logits = shared._logits
        ce = mixed_ce(logits, batch.targets, batch.mix, rows_only=False)
        loss = total - (len(self.parts) - 1) * ce
        terms["ce"] = ce.detach()
        self._outs = outs
        return StepOutput(loss=loss, logits=logits, targets=batch.targets, terms=terms)

    def after_optimizer_step(self, model: nn.Module, batch: Batch, out: StepOutput) -> None:
        for name, part in self.parts.items():
            part.after_optimizer_step(model, batch, self._outs.get(name, out))
        self._outs = {}

    # --- state ------------------------------------------------------------------------------
    def rank_state(self) -> Any:
        if not self.rank_local_extra_state:
            return None
        return {name: part.rank_state() for name, part in self.parts.items()}

    def load_rank_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            return
        for name, part in self.parts.items():
            if name in state:
                part.load_rank_state(state[name])

    def describe(self) -> dict[str, Any]:
        parts = {}
        for name, part in self.parts.items():
            described = part.describe()
            described.pop("name", None)
            parts[name] = described
        return {"name": self.name, "parts": parts}
