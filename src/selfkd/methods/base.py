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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from selfkd.config import build_dataclass
from selfkd.errors import ConfigError, ModelError
from selfkd.registry import Registry

if TYPE_CHECKING:
    from selfkd.data.mixing import MixInfo


@dataclass
class Batch:
    """One training batch on the device.

    ``inputs`` are augmented and normalized; ``raw`` are the images before the on-device
    augmentation (for methods that need a second view: ``augment(raw)`` draws a new one);
    ``indices`` are dataset indices (0..num_train-1) for per-sample memories. ``mix`` says how
    ``inputs`` were mixed by ``data.mix`` (:class:`~selfkd.data.mixing.MixInfo`: partners, λ, mixed
    rows; ``targets`` stay the rows' own labels), None when they were not.
    """

    inputs: Tensor
    targets: Tensor
    indices: Tensor
    raw: Tensor
    augment: Callable[[Tensor], Tensor]
    mix: MixInfo | None = None


@dataclass
class StepInfo:
    """Where the engine is: 0-based epoch, step inside the epoch and global step."""

    epoch: int
    step: int
    global_step: int
    epochs: int
    steps_per_epoch: int


@dataclass
class StepOutput:
    """What a training step returns.

    ``loss`` is back-propagated by the engine; ``logits``/``targets`` are the main head's
    predictions on the samples that count for training metrics; ``terms`` are named scalars
    (detached by the engine) that appear as columns in the metrics files.
    """

    loss: Tensor
    logits: Tensor
    targets: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class MethodContext:
    """What a method may know about the run when it is set up."""

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
    """Validate ``values`` against the method's ``Params`` dataclass (unknown keys refused)."""
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
    return method_cls(parse_params(method_cls, values))


def method_defaults(name: str) -> dict[str, Any]:
    """The full parameter set of a method with its defaults (for resolved configs)."""
    method_cls = METHODS.get(name)
    return {"name": METHODS.canonical(name), **dataclasses.asdict(method_cls.Params())}
