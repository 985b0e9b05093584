"""PreAct ResNet-18 for 32x32 inputs, exactly as used by PS-KD and CS-KD.

Architecture facts from PS-KD's official ``models/preact_resnet.py``
(``CIFAR_ResNet18_preActBasic``, lgcnsai/PS-KD-Pytorch @9aa0828), which is the same network as
CS-KD's ``CIFAR_ResNet18`` (alinlab/cs-kd models/resnet.py). Module names follow that file
(``conv1``, ``bn1``, ``layer1..4``, ``linear``; blocks ``bn1``, ``conv1``, ``bn2``, ``conv2``,
``shortcut``) so that its state dicts line up. Weights use PyTorch's default initialisation, as
there.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from selfkd.models.registry import MODELS


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """PS-KD's pre-activation basic block (with its shortcut quirk).

    ``a = ReLU(BN1(x))``; ``out = conv2(ReLU(BN2(conv1(a)))) + shortcut(a)``. The shortcut is
    taken from the *pre-activated* tensor ``a`` (identity on ``a``, or a strided 1x1 conv
    without BN when the shape changes), unlike He et al.'s identity mapping ``F(x) + x``: the
    residual stream passes through BN-ReLU at every block.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + self.shortcut(a)


class PreActResNet(nn.Module):
    """PS-KD/CS-KD CIFAR PreAct ResNet: 3x3 stem, four PreActBlock stages, no final BN-ReLU."""

    taps: ClassVar[dict[str, str]] = {
        "stage1": "layer1",
        "stage2": "layer2",
        "stage3": "layer3",
        "stage4": "layer4",
        "features": "layer4",
        "pooled": "linear:input",
    }

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = _conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer (512 -> num_classes)."""
        return self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # No BN-ReLU here (as in the official code). Adaptive pooling to 1x1 equals the
        # official avg_pool2d(4) on 32x32 inputs (4x4 maps) and also accepts other sizes.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@MODELS.register("preact_resnet18", "preactresnet18", "cifar_resnet18_preact")
def preact_resnet18(num_classes: int, in_channels: int = 3) -> PreActResNet:
    """PreAct ResNet-18 for 32x32 images, exactly as in PS-KD/CS-KD (11.2M params at K=100).

    3x3 stem conv (no bias) -> BN -> ReLU; PreActBlock stages [2,2,2,2], widths 64/128/256/512,
    strides 1/2/2/2; each block's shortcut is taken from its pre-activated input (identity, or
    a strided 1x1 conv without BN); no final BN-ReLU; global average pooling -> Linear(512, K).
    Pooling is adaptive to 1x1, which equals the official ``avg_pool2d(4)`` on 32x32 inputs.
    Source: PS-KD official models/preact_resnet.py, ``CIFAR_ResNet18_preActBasic``
    (lgcnsai/PS-KD-Pytorch @9aa0828) = CS-KD ``CIFAR_ResNet18`` (alinlab/cs-kd). The official
    class also defines two extra Linear "teacher" heads that never affect the logits; they are
    omitted here.
    """
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)
