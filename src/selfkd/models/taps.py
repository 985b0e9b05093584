"""Named feature taps: read a model's inner tensors during its forward pass.

Every registry model has ``taps: dict[str, str]`` mapping tap names to *specs*:

- ``stage1`` ... ``stageN``: the output of each stage;
- ``features``: the final feature map before pooling (after any final norm/ReLU);
- ``pooled``: the penultimate vector, i.e. the input of the final classifier.

A spec is a dotted module path (``"layer2"``, ``"features.denseblock1"``), optionally followed by
``":output"`` (the default) or ``":input"`` (the first positional input of that module).

>>> model = build_model("resnet8", num_classes=10)
>>> with FeatureTaps(model, ["stage2", "pooled"]) as taps:
...     logits = model(images)
...     f2, pooled = taps["stage2"], taps["pooled"]

Captured tensors keep their autograd graph unless ``detach=True``. Only calls made while the
model's own forward runs (``model(x)``, also through DataParallel/DDP) are captured, and each
forward starts afresh; so applying ``model.classifier`` to a feature map after the forward (as
ZF-LS does) does not overwrite ``pooled``. If a module runs several times in one forward, the last
call wins.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from selfkd.errors import ModelError

_KINDS = ("output", "input")


def _unwrap(model: nn.Module) -> nn.Module:
    """The wrapped module of DataParallel/DistributedDataParallel, else ``model``."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        for name in ("module", "_orig_mod"):
            inner = getattr(model, name, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def available_taps(model: nn.Module) -> dict[str, str]:
    """The model's named feature taps (name -> spec); ``{}`` for a model without ``taps``."""
    taps = getattr(_unwrap(model), "taps", None)
    if not isinstance(taps, dict):
        return {}
    return {str(name): str(spec) for name, spec in taps.items()}


def _parse_spec(spec: str) -> tuple[str, str] | None:
    """``"a.b:input"`` -> ``("a.b", "input")``; None when the suffix is not a known kind."""
    path, sep, kind = spec.partition(":")
    if not sep:
        return path, "output"
    return (path, kind) if kind in _KINDS else None


def _example_path(model: nn.Module) -> str:
    children = list(model.named_children())
    containers = [name for name, child in children if any(True for _ in child.children())]
    if containers:
        return containers[min(1, len(containers) - 1)]
    return children[min(1, len(children) - 1)][0] if children else "layer2"


class FeatureTaps:
    """Forward hooks that keep the latest tensors of the named taps of ``model``.

    ``names`` are tap names from :func:`available_taps` (these take precedence) or module-path
    specs of the model (``"layer2"``, ``"layer2:input"``), so a user's own model works too.
    ``taps[name]`` returns the tensor captured during the model's last forward pass. Call
    :meth:`remove` (or use ``with``) to detach the hooks; :meth:`clear` drops the stored tensors.
    A deep copy of a tapped model copies the hooks too: tap the copy separately.
    """

    def __init__(
        self, model: nn.Module, names: str | Iterable[str], *, detach: bool = False
    ) -> None:
        if isinstance(names, str):
            names = [names]
        self.model = _unwrap(model)
        self.detach = detach
        self.specs: dict[str, str] = {}
        self._store: dict[str, Any] = {}
        self._depth = 0
        self._handles: list[Any] = []
        known = available_taps(self.model)
        resolved: dict[str, tuple[nn.Module, str]] = {}
        for name in names:
            spec = known.get(name, name)
            target = self._resolve(name, spec, is_tap=name in known)
            self.specs[name] = spec
            resolved[name] = target
        # The root pre-hook runs first (prepend) and the root hook last, so that even taps on
        # the model itself ("" or ":input") fall inside the capture window.
        self._handles.append(self.model.register_forward_pre_hook(self._begin, prepend=True))
        for name, (module, kind) in resolved.items():
            if kind == "input":
                handle = module.register_forward_pre_hook(self._input_hook(name), with_kwargs=True)
            else:
                handle = module.register_forward_hook(self._output_hook(name))
            self._handles.append(handle)
        self._handles.append(self.model.register_forward_hook(self._end, always_call=True))

    # -- resolution -------------------------------------------------------------------------

    def _resolve(self, name: str, spec: str, is_tap: bool) -> tuple[nn.Module, str]:
        model_name = type(self.model).__name__
        parsed = _parse_spec(spec)
        module = None
        if parsed is not None:
            try:
                module = self.model.get_submodule(parsed[0])
            except AttributeError:
                module = None
        if module is not None and parsed is not None:
            return module, parsed[1]
        if is_tap:
            raise ModelError(
                f"model {model_name} declares feature tap {name!r} -> {spec!r}, but no module "
                f"matches that spec; fix the model's `taps`"
            )
        available = ", ".join(available_taps(self.model)) or "none"
        example = _example_path(self.model)
        raise ModelError(
            f"model {model_name} has no feature tap {name!r}; available: {available}; "
            f"pass a module path such as {example!r} or '{example}:input' instead"
        )

    # -- hooks ------------------------------------------------------------------------------

    def _begin(self, module: nn.Module, args: Any) -> None:
        if self._depth == 0:
            self._store.clear()
        self._depth += 1

    def _end(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth = max(0, self._depth - 1)

    def _keep(self, name: str, value: Any) -> None:
        if self._depth > 0:
            if self.detach and hasattr(value, "detach"):
                value = value.detach()
            self._store[name] = value

    def _input_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if args:
                self._keep(name, args[0])
            elif kwargs:
                self._keep(name, next(iter(kwargs.values())))

        return hook

    def _output_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._keep(name, output)

        return hook

    # -- access -----------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The tap names this object records."""
        return list(self.specs)

    def __getitem__(self, name: str) -> Any:
        try:
            return self._store[name]
        except KeyError:
            model_name = type(self.model).__name__
            if name not in self.specs:
                raise ModelError(
                    f"feature tap {name!r} is not recorded for model {model_name}; "
                    f"recorded: {', '.join(self.specs) or 'none'}"
                ) from None
            raise ModelError(
                f"feature tap {name!r} of model {model_name} has not been captured: call "
                f"model(x) first (its forward must reach {self.specs[name]!r})"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._store

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def as_dict(self) -> dict[str, Any]:
        """The tensors captured during the last forward, by tap name."""
        return dict(self._store)

    def clear(self) -> None:
        """Drop the stored tensors (and the autograd graphs they keep alive)."""
        self._store.clear()

    def remove(self) -> None:
        """Remove all hooks; stored tensors stay readable until :meth:`clear`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._depth = 0

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        specs = ", ".join(f"{k}={v!r}" for k, v in self.specs.items())
        return f"FeatureTaps({type(self.model).__name__}: {specs})"
