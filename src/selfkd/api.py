"""Use any selfkd method inside your own training loop.

:class:`SelfKD` wraps a method object (the same one the engine drives) around your model, so a
loop you already have gains a self-KD loss in a few lines::

    kd = SelfKD("aikd", model, teacher=superior, num_classes=10, num_train=len(train_set),
                epochs=epochs, steps_per_epoch=len(loader))
    opt = torch.optim.SGD([*model.parameters(), *kd.parameters()], lr=0.1, momentum=0.9)
    for epoch in range(epochs):
        for x, y, idx in loader:                  # idx: dataset indices (for prediction banks)
            loss, terms = kd.loss(x, y, idx, epoch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            kd.step_done()                        # e.g. writes the prediction bank
        kd.epoch_done(epoch)

Methods that learn from a trained model (AI-KD's superior, TF-KD-self's teacher) take it as
``teacher=``. Methods with their own optimizer (AI-KD's critic) step it inside :meth:`loss`.
Methods with extra trainable heads (DRG, BYOT) expose them through :meth:`parameters`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from selfkd.errors import ConfigError
from selfkd.methods import METHODS, Batch, Method, MethodContext, StepInfo, StepOutput
from selfkd.methods.base import parse_params

USER_TEACHER = "<teacher given to SelfKD>"


def _identity(x: Tensor) -> Tensor:
    return x


class SelfKD:
    """A self-KD method attached to a user's model, driven from a user's loop."""

    def __init__(
        self,
        method: str | Method,
        model: nn.Module,
        *,
        num_classes: int,
        num_train: int,
        epochs: int,
        steps_per_epoch: int,
        train_labels: Tensor,
        teacher: nn.Module | None = None,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        augment: Any = None,
        device: torch.device | str | None = None,
        **params: Any,
    ) -> None:
        if isinstance(method, Method):
            if params:
                raise ConfigError(
                    "pass hyper-parameters either in the method object or as keywords"
                )
            self.method = method
        else:
            method_cls = METHODS.get(method)
            self.method = method_cls(parse_params(method_cls, params))
        self.model = model
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.augment = augment or _identity
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self._last: tuple[Batch, StepOutput] | None = None
        self._global_step = 0
        self._epoch_started: int | None = None
        train_labels = torch.as_tensor(train_labels)
        if train_labels.shape != (num_train,):
            raise ConfigError(
                f"train_labels must hold one label per training sample ({num_train}), "
                f"got shape {tuple(train_labels.shape)}"
            )

        param = self.method.teacher_param
        if param is not None and self.method.needs_teacher():
            if teacher is None:
                raise ConfigError(
                    f"method {self.method.name} learns from a trained model of the same "
                    "architecture: pass it as SelfKD(..., teacher=trained_model)"
                )
            setattr(self.method.params, param, USER_TEACHER)
        teacher_module = teacher

        def load_model(path: str) -> nn.Module:
            if teacher_module is None:
                raise ConfigError(f"method {self.method.name} needs teacher=...")
            return teacher_module.to(self.device).eval()

        def build_model() -> nn.Module:
            import copy

            fresh = copy.deepcopy(model)
            for module in fresh.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            return fresh.to(self.device)

        ctx = MethodContext(
            num_classes=num_classes,
            num_train=num_train,
            train_labels=train_labels.to(torch.long).cpu(),
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            device=self.device,
            build_model=build_model,
            load_model=load_model,
            input_shape=input_shape,
        )
        self.method.setup(model, ctx)
        self.method.to(self.device)
        self.method.train()

    def parameters(self) -> list[nn.Parameter]:
        """Extra parameters the method trains with the model (auxiliary heads); add them to your
        optimizer. Empty for most methods."""
        return [p for m in self.method.main_optimizer_modules() for p in m.parameters()]

    def loss(
        self, inputs: Tensor, targets: Tensor, indices: Tensor, epoch: int
    ) -> tuple[Tensor, dict[str, float]]:
        """The method's loss on one batch (already augmented) and its named terms as floats.

        ``indices`` are the samples' dataset indices (0..num_train-1): methods with a
        per-sample memory (PS-KD, AI-KD) read and write their rows by them.
        """
        if self._epoch_started != epoch:
            self.method.on_epoch_start(self.model, epoch)
            self._epoch_started = epoch
            self._step_in_epoch = 0
        inputs = inputs.to(self.device)
        targets = targets.to(self.device)
        batch = Batch(
            inputs=inputs,
            targets=targets,
            indices=indices.to(self.device),
            raw=inputs,
            augment=self.augment,
        )
        info = StepInfo(
            epoch=epoch,
            step=self._step_in_epoch,
            global_step=self._global_step,
            epochs=self.epochs,
            steps_per_epoch=self.steps_per_epoch,
        )
        out = self.method.training_step(self.model, batch, info)
        self._last = (batch, out)
        terms = {k: float(v.detach()) for k, v in out.terms.items()}
        return out.loss, terms

    def step_done(self) -> None:
        """Call after ``optimizer.step()``: lets the method update its memory (banks, ...)."""
        if self._last is None:
            raise RuntimeError("call SelfKD.loss(...) before step_done()")
        batch, out = self._last
        self.method.after_optimizer_step(self.model, batch, out)
        self._last = None
        self._global_step += 1
        self._step_in_epoch += 1

    def epoch_done(self, epoch: int) -> None:
        """Call at the end of every epoch (e.g. refreshes AI-KD's snapshot)."""
        self.method.on_epoch_end(self.model, epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method.state_dict(), "global_step": self._global_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self._global_step = int(state["global_step"])


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
