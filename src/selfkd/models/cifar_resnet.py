"""Small CIFAR-style ResNets (ResNet-8/14/20) for fast CPU runs.

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), section 4.2: a 3x3 stem,
three stages of post-activation basic blocks (n blocks each, depth 6n+2) with widths w/2w/4w and
strides 1/2/2, global average pooling and a linear layer. Shortcuts use option B (1x1 conv + BN
projection) where the shape changes. Any input of at least 8x8 pixels works (e.g. 28x28
Fashion-MNIST with ``in_channels=1``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from selfkd.errors import ConfigError
from selfkd.models.registry import MODELS


class BasicBlock(nn.Module):
    """Post-activation basic block: ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x))."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet of depth 6n+2 with base width ``width``."""

    taps: ClassVar[dict[str, str]] = {
        "stage1": "layer1",
        "stage2": "layer2",
        "stage3": "layer3",
        "features": "layer3",
        "pooled": "linear:input",
    }

    def __init__(
        self, n: int, num_classes: int = 10, in_channels: int = 3, width: int = 16
    ) -> None:
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, n, stride=1)
        self.layer2 = self._make_layer(2 * width, n, stride=2)
        self.layer3 = self._make_layer(4 * width, n, stride=2)
        self.linear = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer (4*width -> num_classes)."""
        return self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _check_width(width: int) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"model option width must be a positive integer, got {width!r}")
    return width


@MODELS.register("resnet8")
def resnet8(num_classes: int, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """ResNet-8, CIFAR-style (1 block per stage, widths w/2w/4w, w=16); tiny, for CPU runs.

    He et al. 2016 section 4.2 (depth 6n+2, n=1): 3x3 stem, post-activation basic blocks,
    strides 1/2/2, option-B (1x1 conv + BN) projection shortcuts, global avg pool, Linear.
    Option ``width`` sets w. Works on any input of at least 8x8 pixels.
    """
    return CifarResNet(1, num_classes, in_channels, _check_width(width))


@MODELS.register("resnet14")
def resnet14(num_classes: int, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """ResNet-14, CIFAR-style (2 blocks per stage, widths w/2w/4w, w=16); small, for CPU runs.

    He et al. 2016 section 4.2 (depth 6n+2, n=2): 3x3 stem, post-activation basic blocks,
    strides 1/2/2, option-B (1x1 conv + BN) projection shortcuts, global avg pool, Linear.
    Option ``width`` sets w. Works on any input of at least 8x8 pixels.
    """
    return CifarResNet(2, num_classes, in_channels, _check_width(width))


@MODELS.register("resnet20")
def resnet20(num_classes: int, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """ResNet-20, CIFAR-style (3 blocks per stage, widths w/2w/4w, w=16); He et al. 2016.

    He et al. 2016 section 4.2 (depth 6n+2, n=3): 3x3 stem, post-activation basic blocks,
    strides 1/2/2, option-B (1x1 conv + BN) projection shortcuts, global avg pool, Linear.
    Option ``width`` sets w. Works on any input of at least 8x8 pixels.
    """
    return CifarResNet(3, num_classes, in_channels, _check_width(width))
