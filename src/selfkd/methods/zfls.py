"""ZF-LS: Zipf's label smoothing.

Liang, Li, Zhou, Zhang, Zhang, Wu, "Efficient One Pass Self-distillation with Zipf's Label
Smoothing", ECCV 2022; official code megvii-research/zipfls @108e27a, PyTorch version (SPEC §6,
research/official-code-notes.md §6).

The final classifier ``model.classifier`` (W, b) is applied to every spatial vector of the
``features`` tap (the final map before pooling; bilinearly upsampled ×2 by default, as the
official ``--dense --upsample bilinear`` flags), each position votes for its argmax class, and
the vote counts s give the non-target soft labels (no gradient, see :mod:`selfkd.losses.zfls`)::

    r_k = 1 + #{j : s_j > s_k},  w_k = r_k^(−power),  π_k = w_k / Σ_{j≠y} w_j  (k ≠ y)
    L   = CE(z, y) + λ · mean_b Σ_{k≠y} π_k (log π_k − log softmax_{k≠y}(z)_k)

Defaults (``ZFLSParams``): λ = 0.1 (official CIFAR-100 and ImageNet), power = 1, upsample
``bilinear``. The official code uses **λ = 1.0 for Tiny-ImageNet** (and iNat21): set
``method.lam: 1.0`` there.

Decisions:

- Only the final head votes (the PyTorch version's default ``--deeplayer 1``); the MegEngine
  version's extra stage-3 head and its auxiliary CE are not implemented.
- Counts (``scatter_add``) and min-ranks (sort + ``searchsorted``) are computed on the device:
  no CPU synchronisation (the official code ranks on the CPU with scipy).
- The votes are taken from the same forward as the logits (train-mode features, detached, in
  float32 with autocast disabled); π gets no gradient.
- The official ``--mask`` option (Zipf loss on correctly classified samples only, off by
  default) is not implemented.
- ``tap`` names the feature map (default ``features``; any tap name or module path of the
  model). A model without that tap or without an ``nn.Linear`` ``classifier`` whose input width
  matches the map's channels raises :class:`~selfkd.errors.ModelError` naming the method.
- Terms: ``ce``, ``zipf`` (unweighted L_zipf), ``loss``. No state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfkd.errors import ConfigError, ModelError
from selfkd.losses.zfls import UPSAMPLE_MODES, dense_votes, vote_counts, zfls_loss
from selfkd.methods.base import (
    METHODS,
    Batch,
    Method,
    MethodContext,
    StepInfo,
    StepOutput,
    check_number,
    no_autocast,
)
from selfkd.models import FeatureTaps, available_taps
from selfkd.models.taps import unwrap_model

__all__ = ["ZFLS", "ZFLSParams"]


@dataclass
class ZFLSParams:
    """Hyper-parameters of ZF-LS (official PyTorch defaults; λ = 1.0 for Tiny-ImageNet)."""

    lam: float = 0.1
    power: float = 1.0
    upsample: str = "bilinear"
    tap: str = "features"

    def validate(self) -> None:
        check_number("lam", self.lam, "nonnegative", "zfls")
        check_number("power", self.power, "positive", "zfls")
        if self.upsample not in UPSAMPLE_MODES:
            raise ConfigError(
                f"method.upsample of zfls must be one of {', '.join(UPSAMPLE_MODES)}, "
                f"got {self.upsample!r}"
            )
        if not isinstance(self.tap, str) or not self.tap:
            raise ConfigError("method.tap of zfls must name a feature tap, e.g. 'features'")


@METHODS.register("zfls", "zf-ls", "zipfls")
class ZFLS(Method):
    """ZF-LS: CE + λ·KL to Zipf soft labels ranked by dense classifier votes (ECCV 2022)."""

    name = "zfls"
    Params = ZFLSParams

    def __init__(self, params: ZFLSParams | None = None) -> None:
        super().__init__(params)
        self.taps: FeatureTaps | None = None
        self._classifier: dict[str, nn.Linear] = {}  # plain dict: not a submodule of the method

    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        p: ZFLSParams = self.params
        inner = unwrap_model(model)
        model_name = type(inner).__name__
        classifier = getattr(inner, "classifier", None)
        if not isinstance(classifier, nn.Linear):
            raise ModelError(
                f"method zfls needs the model's final nn.Linear as `model.classifier`, but model "
                f"{model_name} has none; add a `classifier` attribute pointing at it"
            )
        if ctx.num_classes < 2:
            raise ConfigError("method zfls needs at least 2 classes")
        taps = available_taps(inner)
        if p.tap not in taps:
            try:
                inner.get_submodule(p.tap.partition(":")[0])
            except AttributeError:
                raise ModelError(
                    f"method zfls needs feature tap {p.tap!r} (the final feature map before "
                    f"pooling) but model {model_name} has none; available: "
                    f"{', '.join(taps) or 'none'}; set method.tap to a tap or module path"
                ) from None
        self.taps = FeatureTaps(inner, [p.tap], detach=True)
        self._classifier["fc"] = classifier

    def training_step(self, model: nn.Module, batch: Batch, info: StepInfo) -> StepOutput:
        if self.taps is None:
            raise RuntimeError("ZFLS.setup(model, ctx) must be called before training_step")
        p: ZFLSParams = self.params
        logits = model(batch.inputs)
        features = self.taps[p.tap]
        self.taps.clear()
        fc = self._classifier["fc"]
        if not isinstance(features, Tensor) or features.dim() != 4:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features)
            raise ModelError(
                f"method zfls needs a B×C×h×w feature map at tap {p.tap!r}, got {shape}"
            )
        if features.shape[1] != fc.in_features:
            raise ModelError(
                f"method zfls: tap {p.tap!r} has {features.shape[1]} channels but "
                f"model.classifier takes {fc.in_features}; point method.tap at the map the "
                "classifier pools"
            )
        with torch.no_grad(), no_autocast(logits.device):
            votes = dense_votes(features, fc.weight, fc.bias, p.upsample)
            counts = vote_counts(votes, logits.shape[1])
        with no_autocast(logits.device):
            loss, terms = zfls_loss(logits, batch.targets, counts, lam=p.lam, power=p.power)
        return StepOutput(
            loss=loss, logits=logits, targets=batch.targets, terms={**terms, "loss": loss.detach()}
        )
