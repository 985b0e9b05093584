"""The model registry and :func:`build_model`.

Every model factory registered here has the signature
``factory(num_classes: int, in_channels: int = 3, *, <options>) -> nn.Module`` and a docstring
whose first line is a one-line description (shown by ``selfkd list``). The returned model maps a
``(B, in_channels, H, W)`` image batch to ``(B, num_classes)`` logits and exposes ``taps`` (named
feature taps, see :mod:`selfkd.models.taps`) and ``classifier`` (its final ``nn.Linear``).
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable
from typing import Any

from torch import nn

from selfkd.errors import ConfigError
from selfkd.registry import Registry, close_matches

ModelFactory = Callable[..., nn.Module]


class ModelRegistry(Registry[ModelFactory]):
    """The registered models plus ``timm/<name>`` and ``tv/<name>`` (any library model)."""

    def canonical(self, name: str) -> str:
        from selfkd.models.external import check_name, split_name

        if isinstance(name, str) and split_name(name) is not None:
            return check_name(name)
        return super().canonical(name)

    def get(self, name: str) -> ModelFactory:
        from selfkd.models.external import build_external, split_name

        if isinstance(name, str) and split_name(name) is not None:
            return functools.partial(build_external, self.canonical(name))
        return super().get(name)

    def __contains__(self, name: object) -> bool:
        from selfkd.models.external import split_name

        if isinstance(name, str) and split_name(name) is not None:
            try:
                self.canonical(name)
            except ConfigError:
                return False
            return True
        return super().__contains__(name)

    def describe(self) -> list[tuple[str, str]]:
        return [
            *super().describe(),
            (
                "timm/<name>",
                "any timm model, e.g. timm/resnet50, timm/efficientnet_b0 (pip install timm; "
                "timm.list_models('*resnet*') lists names); options pretrained, weights, taps",
            ),
            (
                "tv/<name>",
                "any torchvision classification model, e.g. tv/resnet34, tv/mobilenet_v3_large "
                "(torchvision.models.list_models()); options pretrained, weights, taps",
            ),
        ]


MODELS: ModelRegistry = ModelRegistry("model")

_FIXED_ARGS = ("num_classes", "in_channels")


def _as_int(value: Any, what: str, minimum: int, model: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"model {model!r}: {what} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ConfigError(f"model {model!r}: {what} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"model {model!r}: {what} must be at least {minimum}, got {number}")
    return number


def model_options(name: str) -> dict[str, Any]:
    """The options a model accepts besides ``num_classes``/``in_channels``, with defaults.

    A required option (no default) maps to ``inspect.Parameter.empty``.
    """
    factory = MODELS.get(name)
    options: dict[str, Any] = {}
    for param in inspect.signature(factory).parameters.values():
        if param.name in _FIXED_ARGS:
            continue
        if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            options[param.name] = param.default
    return options


def _accepts_any_keyword(factory: ModelFactory) -> bool:
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(factory).parameters.values()
    )


def build_model(name: str, num_classes: int, in_channels: int = 3, **options: Any) -> nn.Module:
    """Build the registered model ``name`` (or an alias) with fresh (untrained) weights.

    ``timm/<name>`` and ``tv/<name>`` build any timm / torchvision model
    (:mod:`selfkd.models.external`). Raises :class:`ConfigError` for an unknown model (with
    close matches), an option the
    model's factory does not accept (naming the accepted ones), ``num_classes < 2`` or
    ``in_channels < 1``.
    """
    canonical = MODELS.canonical(name)
    factory = MODELS.get(canonical)
    num_classes = _as_int(num_classes, "num_classes", 2, canonical)
    in_channels = _as_int(in_channels, "in_channels", 1, canonical)

    accepted = model_options(canonical)
    if not _accepts_any_keyword(factory):
        unknown = [key for key in options if key not in accepted]
        if unknown:
            names = ", ".join(repr(key) for key in unknown)
            hint = close_matches(unknown[0], list(accepted)) if len(unknown) == 1 else ""
            allowed = ", ".join(accepted) if accepted else "none"
            raise ConfigError(
                f"model {canonical!r} has no option {names}{hint}; accepted options: {allowed}"
            )
    missing = [k for k, v in accepted.items() if v is inspect.Parameter.empty and k not in options]
    if missing:
        raise ConfigError(f"model {canonical!r} needs option(s): {', '.join(missing)}")
    return factory(num_classes=num_classes, in_channels=in_channels, **options)
