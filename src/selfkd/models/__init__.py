"""Model registry, the backbones used in the self-KD papers, and named feature taps.

>>> from selfkd.models import build_model, FeatureTaps
>>> model = build_model("preact_resnet18", num_classes=100)
"""

from selfkd.models import (  # noqa: F401  (imported to register the models)
    cifar_resnet,
    densenet_cifar,
    preact_resnet,
    torchvision_models,
)
from selfkd.models.registry import MODELS, build_model, model_options
from selfkd.models.taps import FeatureTaps, available_taps

__all__ = ["MODELS", "FeatureTaps", "available_taps", "build_model", "model_options"]
