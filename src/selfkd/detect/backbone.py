"""A selfkd run's ResNet as the backbone of torchvision's Faster R-CNN."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import ResNet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d

from selfkd.engine import checkpoint as ckpt
from selfkd.errors import CheckpointError, ModelError, RunDirError

STAGES = ("layer1", "layer2", "layer3", "layer4")


def checkpoint_file(run: str | Path, which: str = "last") -> Path:
    """RUN/checkpoints/<which>.pt, or ``run`` itself when it is a file."""
    path = Path(run)
    if path.is_file():
        return path
    found = path / "checkpoints" / f"{which}.pt"
    if found.is_file():
        return found
    raise RunDirError(
        f"{path} is not a run directory with checkpoints/{which}.pt; pass the folder a "
        "`selfkd train` run wrote or one of its .pt files"
    )


def load_classifier(run: str | Path, which: str = "last") -> tuple[nn.Module, str]:
    """(model with the run's weights, model name) from a run's checkpoint (``weights_only``)."""
    from selfkd.models import build_model

    path = checkpoint_file(run, which)
    state = ckpt.load_checkpoint(path, map_location="cpu")
    meta: dict[str, Any] = state.get("meta", {}) or {}
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    model_cfg = config.get("model") if isinstance(config.get("model"), dict) else None
    if model_cfg is None or "num_classes" not in meta:
        raise CheckpointError(f"{path} does not record its model; it was not written by selfkd")
    name = str(model_cfg.get("name"))
    options = dict(model_cfg.get("options") or {})
    options.pop("pretrained", None)  # the run's own weights are loaded below
    options.pop("weights", None)
    model = build_model(
        name, num_classes=int(meta["num_classes"]), in_channels=int(meta.get("in_channels", 3)),
        **options,
    )  # fmt: skip
    model.load_state_dict(state["model"])
    return model, name


def check_resnet(model: nn.Module, name: str) -> ResNet:
    """``model`` if Faster R-CNN can take it (a torchvision ResNet); else a one-line ModelError."""
    if not isinstance(model, ResNet) or any(not hasattr(model, s) for s in STAGES):
        raise ModelError(
            f"model {name} ({type(model).__name__}) cannot be a Faster R-CNN backbone: the "
            "detector takes torchvision ResNets (model.name tv/resnet152, tv/resnet50, resnet18, "
            "resnet50); train the classifier with one of them"
        )
    if model.conv1.in_channels != 3:
        raise ModelError(
            f"model {name} takes {model.conv1.in_channels}-channel images; VOC detection needs 3"
        )
    return model


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d replaced by a FrozenBatchNorm2d with the same statistics (batch 1)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def faster_rcnn(
    resnet: ResNet,
    num_classes: int = 21,
    *,
    trainable_layers: int = 3,
    min_size: int = 600,
    max_size: int = 1000,
) -> FasterRCNN:
    """Faster R-CNN (FPN on layer1..4) with ``resnet``'s weights; ``trainable_layers`` of the
    last stages are fine-tuned (torchvision's default 3: layer2..4), the rest frozen."""
    if not 0 <= trainable_layers <= 5:
        raise ModelError(f"trainable_layers must be in 0..5, got {trainable_layers}")
    body = freeze_batchnorm(resnet)
    train_names = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    for pname, p in body.named_parameters():
        p.requires_grad_(any(pname.startswith(n) for n in train_names))
    channels = []
    for stage in STAGES:
        last = list(getattr(body, stage).children())[-1]
        conv = last.conv3 if hasattr(last, "conv3") else last.conv2
        channels.append(int(conv.out_channels))
    fpn = BackboneWithFPN(
        body, return_layers={s: str(i) for i, s in enumerate(STAGES)},
        in_channels_list=channels, out_channels=256,
    )  # fmt: skip
    return FasterRCNN(fpn, num_classes=num_classes, min_size=min_size, max_size=max_size)


@torch.no_grad()
def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether the convolution weights of ``a`` equal those of ``b`` (tests, sanity checks)."""
    wa = {k: v for k, v in a.state_dict().items() if k.endswith("conv1.weight")}
    wb = {k: v for k, v in b.state_dict().items() if k.endswith("conv1.weight")}
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
