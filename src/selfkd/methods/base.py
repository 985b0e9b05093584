"""The interface between the training engine and a self-KD method.

The engine never asks which method it runs. Each step it hands the method a :class:`Batch`
(already on the device, augmented) and gets back a :class:`StepOutput`: the loss to
back-propagate, the logits to score, and named loss terms to log. A method

- owns its hyper-parameters as a ``Params`` dataclass (its defaults live there, nowhere else);
- may own modules (``nn.Module`` attributes: an auxiliary head, a critic). Those listed by
  :meth:`Method.main_optimizer_modules` are trained by the engine's optimizer together with the
  model; others (AI-KD's critic) are trained by the method's own optimizer inside
  :meth:`Method.training_step`;
- keeps its state (banks, critic, its optimizer, counters) in ``state_dict()``: module parameters
  and buffers as usual, anything else through ``get_extra_state``/``set_extra_state``. The engine
  saves and restores it with every checkpoint.

Shared here, so that a method file is its loss: validation of ``Params`` once (in
:meth:`Method.__init__`); the split rule for mixed batches (:func:`split_step`,
:func:`mix_split`); frozen held models (:meth:`Method.hold`: a superior, a teacher, a snapshot);
autocast control (:func:`no_autocast`); and every per-process fact and DDP hook through
:class:`MethodContext` (``batch_size``, ``gather``, ``reduce_grads``, ``rank``, ``world_size``).
The step types live in the leaf :mod:`selfkd.steps` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from selfkd.errors import ConfigError, ModelError
from selfkd.losses.core import freeze
from selfkd.losses.mixing import mixed_ce, split_loss
from selfkd.mixspec import MixSpec, parse_mix, split_rule
from selfkd.registry import Registry
from selfkd.schema import build_dataclass
from selfkd.steps import Batch, MixInfo, StepInfo, StepOutput

__all__ = [
    "METHODS",
    "Batch",
    "Method",
    "MethodContext",
    "MixInfo",
    "NoParams",
    "StepInfo",
    "StepOutput",
    "build_method",
    "check_number",
    "freeze",
    "frozen_forward",
    "inference_logits",
    "method_defaults",
    "mix_split",
    "no_autocast",
    "parse_params",
    "split_step",
    "unmixed_part",
]

#: a DDP hook ``gather(indices, rows) -> (indices, rows)`` of every rank (selfkd.banks.Gather)
Gather = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass
class MethodContext:
    """What a method may know about the run when it is set up.

    Every per-process fact and DDP hook reaches a method here, and only here: ``rank`` and
    ``world_size``, ``batch_size`` (this process's batch), ``gather`` and ``reduce_grads``.
    ``config`` is the resolved config as a mapping, for information only: methods read the typed
    fields (``batch_size`` and ``mix`` are taken from it when not given).
    """

    num_classes: int
    num_train: int
    train_labels: Tensor
    epochs: int
    steps_per_epoch: int
    device: torch.device
    build_model: Callable[[], nn.Module]
    load_model: Callable[[str], nn.Module]
    config: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    #: (channels, height, width) of one training input, for heads built from feature shapes
    input_shape: tuple[int, int, int] = (3, 32, 32)
    #: distributed data parallel: this process's rank among ``world_size`` (0 of 1 otherwise)
    rank: int = 0
    world_size: int = 1
    #: under DDP, ``reduce_grads(module, active=True) -> bool`` averages the gradients (and
    #: floating-point buffers) of a module the method trains with its own optimizer over the
    #: ranks; call it on every rank between ``backward`` and ``optimizer.step()``; a rank with no
    #: data passes ``active=False``; False returned: no rank had data, skip the step.
    #: None in a single process (see :func:`selfkd.engine.distributed.reduce_grads`)
    reduce_grads: Callable[..., bool] | None = None
    #: under DDP, ``gather(indices, rows) -> (indices, rows)`` of all ranks, so per-sample
    #: memories (prediction banks) write every rank's rows; None in a single process
    gather: Gather | None = None
    #: samples per step on this process (``data.batch_size`` / ``world_size``); None = unknown
    batch_size: int | None = None
    #: the parsed ``data.mix`` (None: no mixing)
    mix: MixSpec | None = None

    def __post_init__(self) -> None:
        data = (self.config or {}).get("data") or {}
        if self.batch_size is None and data.get("batch_size") is not None:
            self.batch_size = int(data["batch_size"]) // max(1, self.world_size)
        if self.mix is None and data.get("mix"):
            self.mix = parse_mix(data["mix"])


@dataclass
class NoParams:
    """A method without hyper-parameters."""


class Method(nn.Module):
    """Base class of every self-KD method; subclasses set ``name`` and ``Params``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    #: name of the parameter that holds a phase-1 checkpoint ("auto" = train/reuse one)
    teacher_param: ClassVar[str | None] = None
    #: which ``data.mix`` batches (mixup/cutmix) it takes: "none" (refused at start-up),
    #: "full" (the whole batch mixed) or "split" (half the batch, the papers' rule for self-KD)
    mixing: ClassVar[str] = "none"
    #: True when ``get_extra_state()`` holds per-process data (DLB's previous batch, DSR's
    #: previous logits): under DDP a checkpoint keeps every rank's copy and a resume with the
    #: same world size gives each rank its own back (:meth:`rank_state`)
    rank_local_extra_state: ClassVar[bool] = False

    def __init__(self, params: Any = None) -> None:
        super().__init__()
        self.params = params if params is not None else self.Params()
        check = getattr(self.params, "validate", None)
        if callable(check):  # the one place a method's parameters are validated
            check()
        # frozen held models (a superior, a teacher, a snapshot): a plain dict, so they are not
        # submodules (outside parameters() and state_dict()); see hold()
        self._held: dict[str, nn.Module] = {}

    # --- frozen held models -----------------------------------------------------------------
    def hold(self, role: str, model: nn.Module) -> nn.Module:
        """Keep ``model`` frozen under ``role``: eval mode, ``requires_grad=False``, outside the
        method's parameters and ``state_dict``, kept in eval mode by ``method.train()`` and moved
        by ``method.to()``. Returns the model."""
        self._held[role] = freeze(model)
        return model

    def held(self, role: str) -> nn.Module | None:
        """The model held under ``role``, or None."""
        return self._held.get(role)

    def release(self, role: str) -> None:
        """Forget the model held under ``role`` (if any)."""
        self._held.pop(role, None)

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for model in self._held.values():
            model.eval()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> Method:
        # .to()/.cuda() of the method also move its held models
        super()._apply(fn, recurse)
        for model in self._held.values():
            model._apply(fn, recurse)
        return self

    # --- life cycle -------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        """Build owned modules, banks and feature taps; called once before training."""

    def batch_sampler(
        self, labels: Tensor, batch_size: int, seed: int
    ) -> Callable[[int], list[Tensor]] | None:
        """A replacement for the default epoch order: ``epoch -> list of index tensors``.

        Called once before :meth:`setup`; ``labels`` are the training labels (by dataset index).
        The order must be a pure function of (seed, epoch) so that resumed runs see the same
        batches. None keeps the engine's shuffled order.
        """
        return None

    def main_optimizer_modules(self) -> list[nn.Module]:
        """Owned modules trained by the engine's optimizer alongside the model."""
        return []

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Called before the first step of every epoch.

        Not called again when a run resumes in the middle of an epoch: whatever it sets must
        live in the method's state (``state_dict``/extra state) to survive a resume.
        """

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        raise NotImplementedError

    def after_optimizer_step(self, model: nn.Module, batch: Batch, out: StepOutput) -> None:
        """Called after the optimizer step (e.g. to write a prediction bank)."""

    # --- per-process state under DDP --------------------------------------------------------
    def rank_state(self) -> Any:
        """This process's own state, or None: the extra state when ``rank_local_extra_state``.

        The ``state_dict`` a checkpoint stores is rank 0's; under DDP the engine also gathers
        every rank's ``rank_state()`` and hands each rank its own to :meth:`load_rank_state`.
        """
        return self.get_extra_state() if self.rank_local_extra_state else None

    def load_rank_state(self, state: Any) -> None:
        """Restore what :meth:`rank_state` returned on this rank (after ``load_state_dict``)."""
        if self.rank_local_extra_state and state is not None:
            self.set_extra_state(state)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """Called after the last step of every epoch, before evaluation."""

    def needs_teacher(self) -> bool:
        """Whether this configuration needs the phase-1 model named by ``teacher_param``."""
        return self.teacher_param is not None

    def teacher_seed(self, run_seed: int) -> int:
        """``run.seed`` of the phase-1 run that trains the ``auto`` teacher: the student's own
        unless the method's parameters name another (AI-KD's ``superior_seed``)."""
        return run_seed

    # --- helpers ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {}

    def set_extra_state(self, state: Any) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.params)}


#: rules of :func:`check_number`: the test and how the message states it
_NUMBER_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "unit": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "positive": (lambda v: v > 0, "> 0"),
    "nonnegative": (lambda v: v >= 0, "a finite number >= 0"),
}


def check_number(key: str, value: float, rule: str, method: str = "") -> None:
    """A hyper-parameter check: ``rule`` is "unit" ([0, 1]), "positive" (> 0) or
    "nonnegative" (>= 0), finite in every case; ConfigError ``method.<key> [of <method>] must be
    ..., got <value>`` otherwise."""
    test, wording = _NUMBER_RULES[rule]
    if not (math.isfinite(value) and test(value)):
        where = f" of {method}" if method else ""
        raise ConfigError(f"method.{key}{where} must be {wording}, got {value}")


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast disabled for ``device`` (a no-op where autocast does not exist)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # pragma: no cover - exotic device types
        return contextlib.nullcontext()


def unmixed_part(batch: Batch, logits: Tensor) -> tuple[Batch, Tensor]:
    """The split rule's first half (PS-KD §4.1): the unmixed rows of a ``data.mix`` batch and
    their logits, selected by position (no host read of the count), as a batch without ``mix``.
    An unmixed batch is returned as it is."""
    mix = batch.mix
    if mix is None:
        return batch, logits
    keep = mix.unmixed_rows()
    part = dataclasses.replace(
        batch,
        inputs=batch.inputs[keep],
        targets=batch.targets[keep],
        indices=batch.indices[keep],
        raw=batch.raw[keep],
        mix=None,
    )
    return part, logits[keep]


#: a method's own loss on the unmixed rows: (logits, batch, info) -> (loss or None, terms)
OwnLoss = Callable[[Tensor, Batch, StepInfo], tuple[Tensor | None, dict[str, Tensor]]]


def split_step(model: nn.Module, batch: Batch, info: StepInfo, own_loss: OwnLoss) -> StepOutput:
    """One training step under the papers' split rule for mixed batches (PS-KD §4.1).

    Select the unmixed rows (:func:`unmixed_part`) → the method's own loss on them → the mixing
    CE λ·CE(z, y) + (1−λ)·CE(z, y[π]) on the mixed rows (term ``mix_ce``) → the weighted sum
    ``(n_unmixed·L_own + n_mixed·L_mix)/B`` (:func:`selfkd.losses.mixing.split_loss`). Without
    ``batch.mix`` it is the method's own loss on the whole batch. ``own_loss`` returns None for
    no loss (no unmixed row). The output's logits and targets are the whole batch's.
    """
    logits = model(batch.inputs)
    part, part_logits = unmixed_part(batch, logits)
    loss, terms = own_loss(part_logits, part, info)
    mix = batch.mix
    if mix is not None:
        mix_loss = mixed_ce(logits, batch.targets, mix)
        loss = split_loss(loss, mix_loss, mix)
        terms["mix_ce"] = mix_loss.detach()
    assert loss is not None
    return StepOutput(loss=loss, logits=logits, targets=batch.targets, terms=terms)


def inference_logits(model: nn.Module, inputs: Tensor) -> Tensor:
    """``model(inputs)`` in eval mode under ``torch.inference_mode`` (no autograd bookkeeping
    at all), returned as an ordinary tensor (a clone: inference tensors cannot join a graph)."""
    if model.training:
        model.eval()
    with torch.inference_mode():
        logits = model(inputs)
    return logits.clone()


def frozen_forward(
    model: nn.Module, inputs: Tensor, student_logits: Tensor, role: str, method: str
) -> Tensor:
    """Logits of a frozen model (AI-KD's superior, TF-KD's teacher): eval mode, inference
    mode, checked to match the student's logits in shape (ModelError otherwise)."""
    logits = inference_logits(model, inputs)
    if logits.shape != student_logits.shape:
        raise ModelError(
            f"method {method}: the {role} outputs {tuple(logits.shape)} but the student "
            f"{tuple(student_logits.shape)}; phase 1 must train the same model on the same classes"
        )
    return logits


METHODS: Registry[type[Method]] = Registry("method")


def parse_params(method_cls: type[Method], values: dict[str, Any]) -> Any:
    """Validate ``values`` against the method's ``Params`` dataclass (unknown keys refused),
    without building the method (building one validates its parameters itself)."""
    params = build_dataclass(method_cls.Params, values, "method")
    check = getattr(params, "validate", None)
    if callable(check):
        check()
    return params


def build_method(spec: dict[str, Any]) -> Method:
    """Build a method from a config ``method`` section ``{"name": ..., **params}``."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError("method must be a mapping with a 'name', e.g. method: {name: ce}")
    values = {k: v for k, v in spec.items() if k != "name"}
    method_cls = METHODS.get(spec["name"])
    return method_cls(build_dataclass(method_cls.Params, values, "method"))  # validated once


def method_defaults(name: str) -> dict[str, Any]:
    """The full parameter set of a method with its defaults (for resolved configs)."""
    method_cls = METHODS.get(name)
    return {"name": METHODS.canonical(name), **dataclasses.asdict(method_cls.Params())}


def mix_split(spec: MixSpec | None, method: Method) -> bool:
    """Whether ``method`` gets ``data.mix`` batches split (half mixed), by its ``mixing``
    (:func:`selfkd.mixspec.split_rule`); False without mixing. A method that cannot take the
    augmentation is a ConfigError naming the methods that can."""
    if spec is None:
        return False
    able = [n for n in METHODS.names() if METHODS.get(n).mixing != "none"]
    return split_rule(spec, method.name, method.mixing, able)
