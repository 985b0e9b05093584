"""Batch-wise augmentation and normalization on the device.

In-memory datasets hand the engine uint8 batches; the engine moves a batch to the device and
calls :meth:`BatchTransform.train` (or :meth:`BatchTransform.eval`) on the whole batch. There is
no Python loop over samples: every sample gets its own crop offset and flip decision, applied with
two ``gather`` operations.

Crop semantics: the batch is zero-padded by ``crop_padding`` pixels on every side *in pixel space*
(value 0 = black, before normalization) and a window of the original size is taken at an offset
drawn uniformly from ``0..2·crop_padding`` independently per sample and per axis — the same
distribution as torchvision ``RandomCrop(size, padding=crop_padding)`` with ``fill=0``. The flip
is a horizontal flip with probability 0.5 per sample, like ``RandomHorizontalFlip()``.

Randomness comes from the global torch RNG of the batch's device (so saving/restoring
``torch.get_rng_state()`` / ``torch.cuda.get_rng_state()`` in a checkpoint makes augmentation
reproducible on resume) or from an explicit ``generator`` on that device. Draw order per call:
vertical offsets (B), horizontal offsets (B) — only when ``crop_padding > 0`` — then flip
decisions (B) — only when ``hflip``.

File datasets (imagefolder) are augmented per sample by torchvision transforms in the loader; for
them the BatchTransform is built with ``passthrough=True`` and returns its input unchanged
(already a normalized float batch on the device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from selfkd.errors import ConfigError, DataError


class BatchTransform:
    """Random crop (after zero padding) + horizontal flip + normalization of whole batches.

    ``mean``/``std`` are per-channel statistics of pixel values in [0, 1] (one value broadcasts
    over all channels). Inputs are B×C×H×W batches, uint8 in [0, 255] or float in [0, 1], on any
    device; outputs are float32 on the same device.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        hflip: bool = False,
        *,
        passthrough: bool = False,
    ) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if not self.mean or len(self.mean) != len(self.std):
            raise ConfigError(
                f"normalization needs mean and std of equal, non-zero length, got mean={self.mean} "
                f"std={self.std}; give one value per image channel"
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"normalization std must be positive, got {self.std}")
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ConfigError(
                f"augment.crop_padding must be a non-negative integer, got {crop_padding!r}"
            )
        self.crop_padding = crop_padding
        self.hflip = bool(hflip)
        self.passthrough = bool(passthrough)
        self._affine: dict[tuple[str, bool], tuple[Tensor, Tensor]] = {}

    # --- public API --------------------------------------------------------------------------
    def train(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment (random crop after zero padding, random flip) and normalize a batch."""
        if self.passthrough:
            return x
        self._check(x)
        if self.crop_padding > 0 or self.hflip:
            # convert first: gathering float32 is faster than uint8 on the CPU; values stay in the
            # input's range, so normalization still uses the input dtype's scale
            scale, shift = self._coefficients(x)
            return self.crop_flip(x.float(), generator).mul_(scale).add_(shift)
        return self._normalize(x)

    def eval(self, x: Tensor) -> Tensor:
        """Normalize a batch (no augmentation)."""
        if self.passthrough:
            return x
        self._check(x)
        return self._normalize(x)

    def __call__(self, x: Tensor, *, train: bool = True) -> Tensor:
        return self.train(x) if train else self.eval(x)

    def crop_flip(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The geometric part of :meth:`train`, without normalization; keeps ``x``'s dtype."""
        b, c, h, w = x.shape
        p = self.crop_padding
        dev = x.device
        rows = torch.arange(h, device=dev).expand(b, h)
        cols = torch.arange(w, device=dev).expand(b, w)
        if p > 0:
            x = F.pad(x, (p, p, p, p))  # zero padding in pixel space
            oy = torch.randint(0, 2 * p + 1, (b, 1), device=dev, generator=generator)
            ox = torch.randint(0, 2 * p + 1, (b, 1), device=dev, generator=generator)
            rows = rows + oy
            cols = cols + ox
        if self.hflip:
            flip = torch.rand(b, 1, device=dev, generator=generator) < 0.5
            cols = torch.where(flip, cols.flip(1), cols)
        # one gather over the flattened (padded) H×W plane: source pixel of every output pixel
        flat = (rows[:, :, None] * x.shape[3] + cols[:, None, :]).view(b, 1, h * w)
        out = x.reshape(b, c, -1).gather(2, flat.expand(b, c, h * w))
        return out.view(b, c, h, w)

    def describe(self) -> dict[str, Any]:
        """The settings as a plain dict (for the run's resolved config)."""
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_padding": self.crop_padding,
            "hflip": self.hflip,
            "passthrough": self.passthrough,
        }

    def __repr__(self) -> str:
        if self.passthrough:
            return "BatchTransform(passthrough=True)"
        return (
            f"BatchTransform(mean={self.mean}, std={self.std}, crop_padding={self.crop_padding}, "
            f"hflip={self.hflip})"
        )

    # --- internals ---------------------------------------------------------------------------
    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise DataError(
                f"BatchTransform expects a B×C×H×W tensor, got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        if len(self.mean) != 1 and x.shape[1] != len(self.mean):
            raise ConfigError(
                f"normalization has {len(self.mean)} channels but the images have {x.shape[1]}; "
                "set normalize.mean/std with one value per image channel"
            )

    def _coefficients(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` with ``normalized = x·scale + shift`` for ``x``'s dtype and device."""
        is_uint8 = x.dtype == torch.uint8
        key = (str(x.device), is_uint8)
        if key not in self._affine:
            mean = torch.tensor(self.mean, dtype=torch.float32)
            std = torch.tensor(self.std, dtype=torch.float32)
            scale = 1.0 / (std * 255.0) if is_uint8 else 1.0 / std
            shift = -mean / std
            self._affine[key] = (
                scale.view(1, -1, 1, 1).to(x.device),
                shift.view(1, -1, 1, 1).to(x.device),
            )
        return self._affine[key]

    def _normalize(self, x: Tensor) -> Tensor:
        scale, shift = self._coefficients(x)
        return torch.addcmul(shift, x.float(), scale)
