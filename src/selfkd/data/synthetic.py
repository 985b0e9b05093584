"""A procedural dataset for tests and smoke runs (no files needed).

Every class has a fixed random low-frequency template (a 4×4 grid of random values per channel,
shared part plus class-specific part, bilinearly upsampled). A sample is its class template,
randomly shifted (a window at a random offset of up to ``image_size // 8`` pixels), with random
contrast and brightness, a random low-frequency nuisance pattern and per-pixel Gaussian noise
(std ``noise`` in [0, 1] pixel units), stored as uint8. Classes share most of their structure, so
a small CNN needs a few epochs to separate them. Everything is a pure function of the options
(``seed`` included): templates, the train set and the test set use separate generator streams.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from selfkd.data.base import ArrayImageDataset, AugmentSpec, RawSplits
from selfkd.data.registry import DATASETS, check_options
from selfkd.errors import ConfigError

_GRID = 4


def _gen(seed: int, stream: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + stream * 7_919 + 12_345) % (2**63))
    return g


def _low_freq(n: int, channels: int, size: int, g: torch.Generator) -> Tensor:
    grid = torch.randn(n, channels, _GRID, _GRID, generator=g)
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)


def _samples(
    templates: Tensor, per_class: int, size: int, margin: int, noise: float, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    k, c, big, _ = templates.shape
    labels = torch.arange(k).repeat_interleave(per_class)
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    n = labels.numel()
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.6, 1.4, generator=g)
    brightness = 0.08 * torch.randn(n, 1, 1, 1, generator=g)
    x = templates[labels] * contrast + brightness + 0.12 * _low_freq(n, c, big, g)
    oy = torch.randint(0, 2 * margin + 1, (n, 1), generator=g)
    ox = torch.randint(0, 2 * margin + 1, (n, 1), generator=g)
    rows = (torch.arange(size) + oy)[:, None, :, None].expand(n, c, size, big)
    x = x.gather(2, rows)
    cols = (torch.arange(size) + ox)[:, None, None, :].expand(n, c, size, size)
    x = x.gather(3, cols)
    x = 0.5 + x + noise * torch.randn(x.shape, generator=g)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


@DATASETS.register("synthetic")
def synthetic(root: str | None = None, **options: Any) -> RawSplits:
    """Procedural class templates + shifts + noise: a tiny learnable dataset needing no files.

    Options: num_classes (10), image_size (32), channels (3), train_per_class (50),
    test_per_class (20), noise (0.15), seed (0). ``root`` is ignored.
    """
    opts = check_options(
        "synthetic",
        options,
        {
            "num_classes": 10,
            "image_size": 32,
            "channels": 3,
            "train_per_class": 50,
            "test_per_class": 20,
            "noise": 0.15,
            "seed": 0,
        },
    )
    for key, low in (
        ("num_classes", 2),
        ("image_size", 8),
        ("channels", 1),
        ("train_per_class", 1),
        ("test_per_class", 1),
        ("seed", 0),
    ):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"data.options.{key} must be an integer >= {low}, got {v!r}")
    noise = opts["noise"]
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
        raise ConfigError(f"data.options.noise must be a number >= 0, got {noise!r}")
    k, size, c, seed = opts["num_classes"], opts["image_size"], opts["channels"], opts["seed"]
    margin = max(1, size // 8)
    big = size + 2 * margin
    g = _gen(seed, 0)
    shared = _low_freq(1, c, big, g)
    specific = _low_freq(k, c, big, g)
    templates = 0.5 * shared + 0.5 * specific
    templates = 0.16 * templates / templates.std()
    train = _samples(templates, opts["train_per_class"], size, margin, float(noise), _gen(seed, 1))
    test = _samples(templates, opts["test_per_class"], size, margin, float(noise), _gen(seed, 2))
    names = [f"class_{i}" for i in range(k)]
    pixels = train[0].float().div(255).transpose(0, 1).reshape(c, -1)
    mean = tuple(round(float(v), 4) for v in pixels.mean(1))
    std = tuple(round(max(float(v), 1e-3), 4) for v in pixels.std(1))
    return RawSplits(
        train=ArrayImageDataset(*train, names),
        test=ArrayImageDataset(*test, names),
        num_classes=k,
        in_channels=c,
        image_size=size,
        mean=mean,
        std=std,
        augment=AugmentSpec("pad_crop", crop_size=size, crop_padding=max(1, size // 8), hflip=True),
        class_names=names,
        root=None,
        options=opts,
    )
