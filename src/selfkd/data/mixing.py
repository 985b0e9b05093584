"""Mixing augmentations applied to whole batches on the device: Cutout, Mixup and CutMix.

Configured by ``data.mix`` (empty = off)::

    data:
      mix: {name: cutmix, alpha: 1.0, prob: 1.0}

- ``cutout`` (DeVries & Taylor, arXiv 1708.04552): every sample gets one ``size``×``size``
  square, centred at a uniformly drawn pixel and clipped at the image border, set to 0 *after
  normalization* (the per-channel mean image, as in the Cutout code where the transform follows
  ``Normalize``). ``size`` defaults to half the image side: 16 px on 32-px CIFAR, the Cutout
  paper's CIFAR-10 value (PS-KD §4.1 uses 8 on CIFAR-100). Labels are unchanged.
- ``mixup`` (Zhang et al., ICLR 2018): ``x' = λ·x + (1−λ)·x[π]``, one λ ~ Beta(α, α) per batch.
- ``cutmix`` (Yun et al., ICCV 2019): one box per batch (as in the CutMix code): side ratio
  ``√(1−λ₀)`` with λ₀ ~ Beta(α, α), centre uniform over the pixels, edges
  ``centre ∓ ⌊side/2⌋`` clipped at the border; inside it every mixed sample takes the pixels of
  its partner ``π(i)``; λ is then corrected to the exact kept area ``1 − box/(H·W)``.

Both label-mixing augmentations train with ``λ·CE(z, y) + (1−λ)·CE(z, y[π])``
(:func:`selfkd.losses.mixing.mixed_ce`). ``alpha`` defaults to 1 (λ uniform; CutMix and PS-KD
§4.1); ``prob`` (default 1) is the probability that a batch is mixed at all.

**Split rule** (PS-KD §4.1: "PS-KD is applied to the half of the data in a randomly shuffled
mini-batch, and Cutout or CutMix is performed on another half"; AI-KD table 7 compares the same
combinations): with ``split`` a random ⌊B/2⌋ rows of the batch are mixed (partners drawn among
those rows) and the other rows are returned bit-identical; each sample takes either the self-KD
target or the augmentation. The engine asks for it when the method's ``mixing`` is ``"split"``
(PS-KD, AI-KD) unless ``data.mix.split`` says otherwise. Cutout changes no label, so any method
takes it on the whole batch (no :class:`MixInfo`); under the split rule the cut rows are
reported with λ = 1 and π = identity, i.e. they train with plain hard-label CE like the paper's
Cutout half.

Keys of ``data.mix``: ``name``, ``alpha`` (mixup/cutmix), ``size`` (cutout), ``prob`` and
``split`` (null = by the method; ``true`` splits for any method; ``false`` is refused for
"split" methods with mixup/cutmix). The engine refuses mixup/cutmix at start-up for methods
whose ``Method.mixing`` is "none" and records the resolved section (``split`` filled in) in the
run's config. Methods log the mixed-row loss as the term ``mix_ce``; epoch averages count the
unmixed batches of ``prob`` < 1 as 0 for it (for ``ce``, ``train_ce + train_mix_ce`` is then
the epoch's ``train_loss``).

Randomness comes from the global torch RNG of the batch's device (checkpointed by the engine,
so resumed runs draw the same boxes) or from an explicit ``generator`` on that device; no
per-sample Python loop and, with ``prob`` 1, no host synchronisation. Draw order per call: the
``prob`` decision (only when ``prob`` < 1); the rows and partners (split: a permutation of B, then
of ⌊B/2⌋; otherwise one permutation of B; cutout draws none without split); then cutout's centres
(B rows, B columns), or mixup's λ (two Gamma draws), or cutmix's λ₀ (two Gamma draws) and centre
(row, column).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from selfkd.errors import DataError
from selfkd.mixspec import MIXES, MIXING_MODES, MixSpec, check_mix_values, parse_mix
from selfkd.steps import MixInfo

__all__ = ["MIXES", "MIXING_MODES", "MixInfo", "MixSpec", "Mixer", "sample_beta"]


def sample_beta(
    alpha: float, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """One λ ~ Beta(α, α) as a 0-dim float32 tensor on ``device`` (G₁/(G₁+G₂), G ~ Gamma(α))."""
    conc = torch.full((2,), float(alpha), device=device, dtype=torch.float64)
    g = torch._standard_gamma(conc, generator=generator)
    total = g.sum()
    # both draws underflow only for tiny α, where Beta(α, α) puts its mass on 0 and 1
    lam = torch.where(total > 0, g[0] / total.clamp_min(1e-300), (g[0] >= g[1]).double())
    return lam.float()


class Mixer:
    """Cutout, Mixup or CutMix on whole batches (see the module docstring)."""

    def __init__(
        self,
        name: str,
        alpha: float = 1.0,
        size: int | None = None,
        prob: float = 1.0,
        split: bool | None = None,
    ) -> None:
        check_mix_values(name, alpha, size, prob)
        self.name = name
        self.alpha = float(alpha)
        self.size = size
        self.prob = float(prob)
        self.split = split

    @classmethod
    def from_config(
        cls, spec: dict[str, Any] | None, image_size: int | tuple[int, int] | None = None
    ) -> Mixer | None:
        """Build from a ``data.mix`` mapping (:func:`selfkd.mixspec.parse_mix`); None when it is
        empty or names ``none``."""
        return cls.from_spec(parse_mix(spec), image_size)

    @classmethod
    def from_spec(
        cls, spec: MixSpec | None, image_size: int | tuple[int, int] | None = None
    ) -> Mixer | None:
        """Build from a parsed ``data.mix`` (``DataConfig.mix_spec``); None for no mixing.

        ``image_size`` (side or (height, width)) resolves the default cutout ``size`` (half the
        smaller side).
        """
        if spec is None:
            return None
        size = spec.size
        if spec.name == "cutout" and size is None and image_size is not None:
            side = image_size if isinstance(image_size, int) else min(image_size)
            size = max(1, int(side) // 2)
        return cls(spec.name, spec.alpha, size, spec.prob, spec.split)

    def describe(self, split: bool | None = None) -> dict[str, Any]:
        """The resolved ``data.mix`` section (a valid config again)."""
        out: dict[str, Any] = {"name": self.name}
        if self.name == "cutout":
            out["size"] = self.size
        else:
            out["alpha"] = self.alpha
        out["prob"] = self.prob
        out["split"] = self.split if split is None else split
        return out

    def __repr__(self) -> str:
        return f"Mixer({self.describe()})"

    # --- the augmentation -------------------------------------------------------------------
    def apply(
        self,
        inputs: Tensor,
        targets: Tensor,
        generator: torch.Generator | None = None,
        split: bool = False,
    ) -> tuple[Tensor, MixInfo | None]:
        """Mix a normalized B×C×H×W batch; return the new batch and how it was mixed.

        ``MixInfo`` is None when the batch was left alone (``prob``) or for cutout without
        ``split`` (labels unchanged). ``split``: mix a random ⌊B/2⌋ rows only. ``inputs`` is not
        modified in place.
        """
        if inputs.dim() != 4 and self.name != "mixup":
            raise DataError(
                f"data.mix {self.name} needs B×C×H×W image batches, got {tuple(inputs.shape)}"
            )
        b = inputs.shape[0]
        if targets.shape[0] != b:
            raise DataError(f"data.mix: {b} inputs but {targets.shape[0]} targets")
        dev = inputs.device
        if self.prob < 1.0 and not bool(
            torch.rand((), device=dev, generator=generator) < self.prob
        ):
            return inputs, None
        if split:
            rows, index, unmixed = self._split_rows(b, dev, generator)
        elif self.name == "cutout":
            rows, index, unmixed = None, None, None
        else:
            rows = torch.ones(b, dtype=torch.bool, device=dev)
            index = torch.randperm(b, device=dev, generator=generator)
            unmixed = torch.empty(0, dtype=torch.long, device=dev)

        if self.name == "cutout":
            out = self._cutout(inputs, rows, generator)
            if rows is None:
                return out, None
            assert index is not None
            return out, MixInfo(
                index=index, lam=torch.ones((), device=dev), rows=rows, unmixed=unmixed
            )
        assert rows is not None and index is not None
        if self.name == "mixup":
            lam = sample_beta(self.alpha, dev, generator)
            mixed = inputs * lam.to(inputs.dtype) + inputs[index] * (1 - lam).to(inputs.dtype)
            keep = rows.view(b, *([1] * (inputs.dim() - 1)))
            info = MixInfo(index=index, lam=lam, rows=rows, unmixed=unmixed)
            return torch.where(keep, mixed, inputs), info
        out, lam = self._cutmix(inputs, rows, index, generator)
        return out, MixInfo(index=index, lam=lam, rows=rows, unmixed=unmixed)

    @staticmethod
    def _split_rows(
        b: int, dev: torch.device, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """A random half (⌊B/2⌋) of the rows, partners permuted among those rows, and the
        positions of the other rows (ascending)."""
        order = torch.randperm(b, device=dev, generator=generator)
        chosen = order[: b // 2]
        rows = torch.zeros(b, dtype=torch.bool, device=dev)
        rows[chosen] = True
        index = torch.arange(b, device=dev)
        index[chosen] = chosen[torch.randperm(b // 2, device=dev, generator=generator)]
        unmixed = torch.sort(order[b // 2 :]).values
        return rows, index, unmixed

    def _cutout(
        self, inputs: Tensor, rows: Tensor | None, generator: torch.Generator | None
    ) -> Tensor:
        b, _, h, w = inputs.shape
        dev = inputs.device
        size = self.size if self.size is not None else max(1, min(h, w) // 2)
        cy = torch.randint(0, h, (b, 1), device=dev, generator=generator)
        cx = torch.randint(0, w, (b, 1), device=dev, generator=generator)
        y0, x0 = cy - size // 2, cx - size // 2  # a size×size square, clipped at the border
        ys = torch.arange(h, device=dev)
        xs = torch.arange(w, device=dev)
        in_y = (ys >= y0) & (ys < y0 + size)  # B×H
        in_x = (xs >= x0) & (xs < x0 + size)  # B×W
        hole = in_y[:, :, None] & in_x[:, None, :]  # B×H×W
        if rows is not None:
            hole = hole & rows[:, None, None]
        return inputs.masked_fill(hole[:, None], 0.0)

    def _cutmix(
        self, inputs: Tensor, rows: Tensor, index: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        _, _, h, w = inputs.shape
        dev = inputs.device
        lam0 = sample_beta(self.alpha, dev, generator)
        ratio = torch.sqrt(1.0 - lam0)
        half_h = torch.floor(h * ratio).long() // 2
        half_w = torch.floor(w * ratio).long() // 2
        cy = torch.randint(0, h, (), device=dev, generator=generator)
        cx = torch.randint(0, w, (), device=dev, generator=generator)
        y1, y2 = (cy - half_h).clamp(0, h), (cy + half_h).clamp(0, h)
        x1, x2 = (cx - half_w).clamp(0, w), (cx + half_w).clamp(0, w)
        ys = torch.arange(h, device=dev)
        xs = torch.arange(w, device=dev)
        box = ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None, :]  # H×W
        lam = 1.0 - ((y2 - y1) * (x2 - x1)).float() / float(h * w)
        paste = box[None, None] & rows[:, None, None, None]
        return torch.where(paste, inputs[index], inputs), lam
