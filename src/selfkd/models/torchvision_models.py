"""ImageNet-style torchvision ResNet-18/50 and DenseNet-121, trained from scratch.

These are torchvision's own classes (so state dicts match torchvision's) with two additions:
class-level ``taps`` and a ``classifier`` attribute. They are built with ``weights=None``
(the AI-KD fine-grained protocol trains from scratch at 224x224). When ``in_channels != 3`` the
first convolution is replaced by one of the same shape that takes ``in_channels`` inputs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.densenet import DenseNet
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from selfkd.models.registry import MODELS


def _replace_input_conv(conv: nn.Conv2d, in_channels: int, mode: str) -> nn.Conv2d:
    if in_channels == conv.in_channels:
        return conv
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )
    nn.init.kaiming_normal_(new.weight, mode=mode, nonlinearity="relu")
    return new


class TorchvisionResNet(ResNet):
    """torchvision ``ResNet`` with named feature taps and a ``classifier`` alias for ``fc``."""

    taps: ClassVar[dict[str, str]] = {
        "stage1": "layer1",
        "stage2": "layer2",
        "stage3": "layer3",
        "stage4": "layer4",
        "features": "layer4",
        "pooled": "fc:input",
    }

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer (``fc``)."""
        return self.fc


class TorchvisionDenseNet(DenseNet):
    """torchvision ``DenseNet`` whose final ReLU is a module (``final_relu``) so it can be tapped.

    The forward pass equals torchvision's (features -> ReLU -> global avg pool -> classifier);
    ``final_relu`` has no parameters, so state dicts are unchanged.
    """

    taps: ClassVar[dict[str, str]] = {
        "stage1": "features.denseblock1",
        "stage2": "features.denseblock2",
        "stage3": "features.denseblock3",
        "stage4": "features.denseblock4",
        "features": "final_relu",
        "pooled": "classifier:input",
    }

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.final_relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.final_relu(self.features(x))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.classifier(out)


def _resnet(
    block: type[BasicBlock | Bottleneck],
    layers: list[int],
    num_classes: int,
    in_channels: int,
    zero_init_residual: bool,
) -> TorchvisionResNet:
    model = TorchvisionResNet(
        block, layers, num_classes=num_classes, zero_init_residual=zero_init_residual
    )
    model.conv1 = _replace_input_conv(model.conv1, in_channels, mode="fan_out")
    return model


@MODELS.register("resnet18", "resnet18_imagenet")
def resnet18(
    num_classes: int, in_channels: int = 3, zero_init_residual: bool = False
) -> TorchvisionResNet:
    """ResNet-18, ImageNet-style (7x7/2 stem + max-pool), torchvision, from scratch; 224x224.

    He et al. 2016; ``torchvision.models.resnet18(weights=None)`` with ``num_classes`` set.
    Stages of [2,2,2,2] basic blocks, widths 64-512, adaptive avg pool, Linear(512, K).
    Option ``zero_init_residual`` as in torchvision.
    """
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, zero_init_residual)


@MODELS.register("resnet50", "resnet50_imagenet")
def resnet50(
    num_classes: int, in_channels: int = 3, zero_init_residual: bool = False
) -> TorchvisionResNet:
    """ResNet-50, ImageNet-style (7x7/2 stem + max-pool), torchvision, from scratch; 224x224.

    He et al. 2016; ``torchvision.models.resnet50(weights=None)`` with ``num_classes`` set.
    Stages of [3,4,6,3] bottleneck blocks, output 2048 channels, adaptive avg pool,
    Linear(2048, K). Option ``zero_init_residual`` as in torchvision.
    """
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, zero_init_residual)


@MODELS.register("densenet121", "densenet121_imagenet")
def densenet121(
    num_classes: int, in_channels: int = 3, memory_efficient: bool = False
) -> TorchvisionDenseNet:
    """DenseNet-121, ImageNet-style (7x7/2 stem + max-pool), torchvision, from scratch; 224x224.

    Huang et al. 2017; ``torchvision.models.densenet121(weights=None)`` with ``num_classes`` set:
    growth 32, blocks 6-12-24-16, bn_size 4, 1024 features, adaptive avg pool, Linear(1024, K).
    Option ``memory_efficient`` (gradient checkpointing) as in torchvision.
    """
    model = TorchvisionDenseNet(
        growth_rate=32,
        block_config=(6, 12, 24, 16),
        num_init_features=64,
        num_classes=num_classes,
        memory_efficient=memory_efficient,
    )
    model.features.conv0 = _replace_input_conv(model.features.conv0, in_channels, mode="fan_in")
    return model
