"""Auxiliary classifiers and early-exit heads built from feature-tap shapes (DRG, BYOT).

The heads are sized from the shapes of the model's feature taps, measured once by
:func:`tap_shapes` with a dry forward pass (eval mode, no grad, a batch of two zero images), so
any model with named taps (``stage1..N``, ``features``, ``pooled``) or module-path taps works.

- :class:`AuxiliaryClassifier` (DRG): ``blocks`` × [conv3×3 stride 2 (channels ×2) → BN → ReLU]
  → global average pool → Linear(→K). Two blocks mirror the official LightSKD head's
  SepConv(C→2C, s2) → SepConv(2C→4C, s2) (without its attention mask and separable convs).
- :class:`BottleneckExit` (BYOT): conv1×1 (→mid) → BN → ReLU → conv k×k stride k → BN → ReLU →
  conv1×1 (→out) → BN → ReLU → global average pool (the exit's feature) → Linear(→K), the
  "branchBottleNeck" of the unofficial BYOT implementation. k is the ratio of the tapped map's
  spatial size to the deepest map's, so the exit reaches the last stage's resolution; ``out``
  is the width of the deepest pooled feature so the feature-hint loss needs no adapter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from selfkd.errors import ModelError
from selfkd.models import FeatureTaps

__all__ = [
    "AuxiliaryClassifier",
    "BottleneckExit",
    "exit_kernel",
    "open_taps",
    "spatial_shape",
    "tap_shapes",
]


def open_taps(method: str, model: nn.Module, names: Iterable[str]) -> FeatureTaps:
    """:class:`FeatureTaps` on ``model``; a missing tap raises a ModelError naming ``method``."""
    names = list(names)
    try:
        return FeatureTaps(model, names)
    except ModelError as exc:
        raise ModelError(f"method {method} needs feature taps {names}: {exc}") from None


def tap_shapes(
    model: nn.Module,
    taps: FeatureTaps,
    input_shape: Sequence[int],
    device: torch.device | str | None = None,
) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the tensors ``taps`` captures, from one dry forward pass.

    The forward runs on ``torch.zeros(2, *input_shape)`` in eval mode under ``no_grad`` (so
    BatchNorm running statistics are untouched) and the training flags of every submodule are
    restored afterwards. ``device`` defaults to the device of the model's first parameter.
    """
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, device=device))
        shapes: dict[str, tuple[int, ...]] = {}
        for name in taps.names:
            value = taps[name]
            if not isinstance(value, Tensor):
                raise ModelError(
                    f"feature tap {name!r} of model {type(model).__name__} captured a "
                    f"{type(value).__name__}, not a tensor"
                )
            shapes[name] = tuple(value.shape[1:])
        return shapes
    finally:
        taps.clear()
        for module, mode in modes.items():
            module.training = mode


def spatial_shape(method: str, tap: str, shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` of a convolutional tap; ModelError naming ``method`` for any other shape."""
    if len(shape) != 3:
        raise ModelError(
            f"method {method} needs a C×H×W feature map at tap {tap!r}, got per-sample shape "
            f"{tuple(shape)}"
        )
    c, h, w = (int(v) for v in shape)
    return c, h, w


def exit_kernel(size: Sequence[int], target: Sequence[int]) -> tuple[int, int]:
    """Kernel (= stride) that brings a map of spatial ``size`` to about ``target``: ``size //
    target`` per axis, at least 1. Global pooling follows, so an inexact ratio is harmless."""
    kh = max(1, int(size[0]) // max(1, int(target[0])))
    kw = max(1, int(size[1]) // max(1, int(target[1])))
    return kh, kw


def _conv_bn_relu(
    cin: int, cout: int, kernel: int | tuple[int, int], stride: int | tuple[int, int], pad: int
) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class AuxiliaryClassifier(nn.Module):
    """DRG's auxiliary classifier: [conv3×3 s2 (×2 channels) → BN → ReLU]×blocks → GAP → FC."""

    def __init__(self, in_channels: int, num_classes: int, blocks: int = 2) -> None:
        super().__init__()
        if blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {blocks}")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(blocks):
            layers += _conv_bn_relu(channels, 2 * channels, 3, 2, 1)
            channels *= 2
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.out_channels = channels
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.body(x)).flatten(1))


class BottleneckExit(nn.Module):
    """BYOT exit: 1×1 → k×k stride k → 1×1 convs (BN-ReLU each) → GAP → FC.

    :meth:`forward` returns ``(logits, pooled_feature)``; the feature has ``out_channels`` entries.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_classes: int,
        kernel: tuple[int, int] = (1, 1),
        mid_channels: int | None = None,
    ) -> None:
        super().__init__()
        mid = mid_channels if mid_channels is not None else max(1, out_channels // 4)
        self.body = nn.Sequential(
            *_conv_bn_relu(in_channels, mid, 1, 1, 0),
            *_conv_bn_relu(mid, mid, kernel, kernel, 0),
            *_conv_bn_relu(mid, out_channels, 1, 1, 0),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out_channels, num_classes)
        self.kernel = tuple(kernel)
        _init(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feature = self.pool(self.body(x)).flatten(1)
        return self.fc(feature), feature
