"""Dataset containers shared by every dataset entry.

Two kinds of training data exist:

* :class:`ArrayImageDataset` — the whole split in memory as one ``uint8`` tensor (CIFAR, IDX,
  synthetic). Batches are gathered by tensor indexing (:meth:`ArrayImageDataset.get_batch`) and
  augmented on the device, batch-wise, by :class:`selfkd.data.augment.BatchTransform`.
* :class:`selfkd.data.imagefolder.FileImageDataset` — images decoded from files by a torch
  ``DataLoader`` with per-sample torchvision transforms.

A dataset entry (see :mod:`selfkd.data.registry`) returns a :class:`RawSplits`: the full train and
test splits plus what the rest of the library needs to know about them (classes, channels, image
size, default normalization and augmentation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from selfkd.errors import DataError


def as_index_tensor(indices: Tensor | Sequence[int], length: int | None = None) -> Tensor:
    """``indices`` as a 1-D int64 CPU tensor; DataError if an index is outside ``0..length-1``."""
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if length is not None and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= length):
        raise DataError(
            f"index out of range: got indices in [{int(idx.min())}, {int(idx.max())}] for a "
            f"dataset of {length} samples; indices must lie in 0..{length - 1}"
        )
    return idx


class ArrayImageDataset:
    """A split held in memory: ``images`` uint8 N×C×H×W, ``labels`` int64 N.

    ``dataset[i]`` returns ``(image_uint8, label, i)`` for compatibility with code that expects a
    map-style dataset, but loaders use :meth:`get_batch`, which gathers a whole batch with one
    tensor indexing operation.
    """

    def __init__(self, images: Tensor, labels: Tensor, class_names: Sequence[str]) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(
                "ArrayImageDataset needs images as a uint8 tensor N×C×H×W, got "
                f"{_describe(images)}; convert the pixels to uint8 in [0, 255]"
            )
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() != images.shape[0]:
            raise DataError(
                f"ArrayImageDataset has {images.shape[0]} images but {labels.numel()} labels; "
                "every image needs exactly one label"
            )
        class_names = [str(c) for c in class_names]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
            raise DataError(
                f"labels must lie in 0..{len(class_names) - 1} for {len(class_names)} classes, "
                f"got [{int(labels.min())}, {int(labels.max())}]; check the label file"
            )
        self.images = images.contiguous()
        self.labels = labels.contiguous()
        self.class_names = class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        return self.images[index], int(self.labels[index]), int(index)

    def get_batch(self, indices: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """``(images uint8 B×C×H×W, labels int64 B)`` for ``indices`` (no per-sample Python)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images.index_select(0, idx), self.labels.index_select(0, idx)

    def subset(self, indices: Tensor | Sequence[int]) -> ArrayImageDataset:
        """A new dataset holding ``indices`` (re-indexed 0..len-1, in the given order)."""
        idx = as_index_tensor(indices, len(self))
        return ArrayImageDataset(self.images[idx], self.labels[idx], self.class_names)

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return f"ArrayImageDataset(n={len(self)}, shape={c}×{h}×{w}, classes={self.num_classes})"


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


@dataclass
class AugmentSpec:
    """A dataset's training augmentation.

    ``kind`` is ``"pad_crop"`` (zero-pad by ``crop_padding`` pixels, crop back to ``crop_size``
    at a random offset; CIFAR style) or ``"random_resized_crop"`` (torchvision
    RandomResizedCrop(``crop_size``); test images are resized to ``crop_size·8/7`` and
    center-cropped, the ImageNet/CS-KD fine-grained protocol). ``hflip`` adds a random
    horizontal flip with probability 0.5.
    """

    kind: str
    crop_size: int
    crop_padding: int = 0
    hflip: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "crop_size": self.crop_size,
            "crop_padding": self.crop_padding,
            "hflip": self.hflip,
        }


@dataclass
class RawSplits:
    """What a dataset entry returns: full splits plus their properties and defaults.

    ``train``/``test`` are both :class:`ArrayImageDataset` or both
    :class:`~selfkd.data.imagefolder.FileImageDataset`. ``mean``/``std`` are the default
    per-channel normalization (pixel values in [0, 1]); ``root`` is the folder the files were
    read from (None for generated data); ``options`` are the entry's options with defaults filled.
    """

    train: Any
    test: Any
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: AugmentSpec
    class_names: list[str]
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, ArrayImageDataset)
