"""CIFAR DenseNet-121 as used by PS-KD and CS-KD.

Architecture facts from PS-KD's official ``models/densenet_cifar.py`` (``CIFAR_DenseNet121``,
lgcnsai/PS-KD-Pytorch @9aa0828), identical to CS-KD's ``models/densenet3.py``; DenseNet-BC from
Huang et al. (CVPR 2017). Module names follow the official file (``conv1``, ``dense1..4``,
``trans1..3``, ``bn``, ``linear``) so that its state dicts line up. PyTorch default init.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from selfkd.models.registry import MODELS


class Bottleneck(nn.Module):
    """Dense layer: BN-ReLU-1x1 conv (4k) -> BN-ReLU-3x3 conv (k); output ``cat([new, x])``."""

    def __init__(self, in_planes: int, growth_rate: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], dim=1)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv (compression) -> 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class CifarDenseNet(nn.Module):
    """CIFAR DenseNet-BC: 3x3 stem (no BN/ReLU after it), 4 dense blocks, BN-ReLU-pool-linear head.

    Taps ``stage1..4`` are the dense-block outputs (before each transition), so their spatial
    sizes (32/16/8/4 on 32x32 inputs) match the ResNets' stages.
    """

    taps: ClassVar[dict[str, str]] = {
        "stage1": "dense1",
        "stage2": "dense2",
        "stage3": "dense3",
        "stage4": "dense4",
        "features": "relu",
        "pooled": "linear:input",
    }

    def __init__(
        self,
        nblocks: tuple[int, int, int, int] = (6, 12, 24, 16),
        growth_rate: int = 32,
        reduction: float = 0.5,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.growth_rate = growth_rate
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=3, padding=1, bias=False)
        self.channels: list[int] = []  # channel count after each dense block
        for i, n in enumerate(nblocks, start=1):
            setattr(self, f"dense{i}", self._make_dense(planes, n))
            planes += n * growth_rate
            self.channels.append(planes)
            if i < len(nblocks):
                out_planes = math.floor(planes * reduction)
                setattr(self, f"trans{i}", Transition(planes, out_planes))
                planes = out_planes
        self.num_features = planes
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.linear = nn.Linear(planes, num_classes)

    def _make_dense(self, in_planes: int, n: int) -> nn.Sequential:
        layers = []
        for _ in range(n):
            layers.append(Bottleneck(in_planes, self.growth_rate))
            in_planes += self.growth_rate
        return nn.Sequential(*layers)

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer (1024 -> num_classes for DenseNet-121)."""
        return self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = self.trans3(self.dense3(out))
        out = self.relu(self.bn(self.dense4(out)))
        # Adaptive pooling to 1x1 equals the official avg_pool2d(4) on 32x32 inputs.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@MODELS.register("densenet121_cifar", "cifar_densenet121")
def densenet121_cifar(num_classes: int, in_channels: int = 3) -> CifarDenseNet:
    """DenseNet-121 for 32x32 images (growth 32, blocks 6-12-24-16, 3x3 stem), as in PS-KD/CS-KD.

    Stem 3x3 conv to 64 channels with no BN/ReLU after it; dense layers BN-ReLU-1x1(128)-BN-ReLU-
    3x3(32) concatenated as [new, old]; transitions BN-ReLU-1x1 (compression 0.5)-avgpool2;
    channels 64->256->128->512->256->1024->512->1024; head BN-ReLU-global avg pool-Linear(1024, K)
    (adaptive pooling = the official avg_pool2d(4) on 32x32 inputs).
    Source: PS-KD official models/densenet_cifar.py, ``CIFAR_DenseNet121``
    (lgcnsai/PS-KD-Pytorch @9aa0828) = CS-KD models/densenet3.py; Huang et al. 2017.
    """
    return CifarDenseNet(
        (6, 12, 24, 16),
        growth_rate=32,
        reduction=0.5,
        num_classes=num_classes,
        in_channels=in_channels,
    )
