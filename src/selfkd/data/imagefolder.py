"""Image-folder datasets (CUB-200-2011, Stanford Dogs, MIT67, FGVC-Aircraft, Tiny-ImageNet, …).

Layout: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` (folder names set by the
``train_dir``/``test_dir`` options). Classes are the sub-folders of the training folder, sorted by
name; a test class that the training folder lacks is an error (an empty or missing test class
folder is not: ``build_data`` warns, naming the class). Images are decoded with PIL and converted
to RGB. A file that cannot be decoded is a one-line DataError naming it (``dataset[i]``), or, read
through a loader (:meth:`FileImageDataset.load`), a :class:`CorruptImage` that the loader turns into
that error or skips and counts with ``data.skip_corrupt`` (see :mod:`selfkd.data.loader`).

Transforms (torchvision, per sample, in the loader; the device-side BatchTransform is then a
pass-through):

* protocol ``imagenet`` (default; CS-KD fine-grained protocol): train
  RandomResizedCrop(image_size) + RandomHorizontalFlip; test Resize(round(image_size·8/7)) +
  CenterCrop(image_size) (256/224 for 224);
* protocol ``cifar``: images resized to image_size (shorter side, then center crop); train
  RandomCrop(image_size, padding=crop_padding, zero fill) + RandomHorizontalFlip;
  test unchanged after the resize.

Both end with ToTensor + Normalize (default ImageNet statistics). Randomness comes from the torch
RNG of the process that decodes (the main process with ``workers=0``, else the DataLoader's
seeded workers), so file-dataset augmentation is not exactly reproducible across a resume.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from selfkd.data.base import AugmentSpec, RawSplits, as_index_tensor
from selfkd.data.lighting import imagenet_train_transform
from selfkd.data.registry import DATASETS, check_options
from selfkd.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp",
)  # fmt: skip
#: augmentation kind: random-resized crop, flip, colour jitter, PCA lighting (selfkd.data.lighting)
JITTER_LIGHTING = "random_resized_crop_jitter_lighting"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: what PIL raises for a missing, truncated, garbage or oversized image file
DECODE_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError,
)  # fmt: skip


@dataclass(frozen=True)
class CorruptImage:
    """A sample whose file could not be read or decoded (returned by :meth:`FileImageDataset.load`).

    Picklable, so DataLoader workers hand it to the main process instead of raising there (a
    worker's exception would reach the user as a multi-line traceback).
    """

    path: str
    index: int
    reason: str

    def error(self) -> DataError:
        return DataError(
            f"image {self.path} cannot be decoded ({self.reason}): replace or delete it, or set "
            "data.skip_corrupt=true to skip such files"
        )


class FileImageDataset(torch.utils.data.Dataset):
    """Images stored as files: ``dataset[i] -> (float C×H×W transformed, label, i)``.

    ``samples`` are ``(path, label)`` pairs. Without a transform an item is the RGB image as a
    float tensor in [0, 1] (ToTensor).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        class_names: Sequence[str],
        transform: Callable[[Image.Image], Tensor] | None = None,
    ) -> None:
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.class_names = [str(c) for c in class_names]
        self.labels = torch.tensor([y for _, y in self.samples], dtype=torch.long)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    in_channels = 3

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        item = self.load(index)
        if isinstance(item, CorruptImage):
            raise item.error()
        return item

    def load(self, index: int) -> tuple[Tensor, int, int] | CorruptImage:
        """Like ``dataset[index]``, but a file that cannot be decoded gives a :class:`CorruptImage`.

        Loaders use this so that the decision (raise, or skip and count with
        ``data.skip_corrupt``) is taken in the main process, also with ``workers > 0``.
        """
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except DECODE_ERRORS as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            return CorruptImage(path, int(index), reason[:200])
        tf = self.transform if self.transform is not None else T.ToTensor()
        return tf(image), label, int(index)

    def subset(self, indices: Tensor | Sequence[int]) -> FileImageDataset:
        """A new dataset holding ``indices`` (re-indexed 0..len-1, in the given order)."""
        idx = as_index_tensor(indices, len(self)).tolist()
        return FileImageDataset([self.samples[i] for i in idx], self.class_names, self.transform)

    def with_transform(self, transform: Callable[[Image.Image], Tensor] | None) -> FileImageDataset:
        """The same samples with another transform."""
        return FileImageDataset(self.samples, self.class_names, transform)

    def __repr__(self) -> str:
        return f"FileImageDataset(n={len(self)}, classes={self.num_classes})"


def build_file_transforms(
    augment: AugmentSpec, mean: Sequence[float], std: Sequence[float]
) -> tuple[Callable, Callable]:
    """``(train_transform, eval_transform)`` for a file dataset (PIL image -> float tensor)."""
    size = augment.crop_size
    tail = [T.ToTensor(), T.Normalize(list(mean), list(std))]
    flip = [T.RandomHorizontalFlip()] if augment.hflip else []
    if augment.kind == "random_resized_crop":
        train = [T.RandomResizedCrop(size), *flip]
        test = [T.Resize(round(size * 8 / 7)), T.CenterCrop(size)]
    elif augment.kind == JITTER_LIGHTING:  # ImageNet protocol of PS-KD §4.2
        test = [T.Resize(round(size * 8 / 7)), T.CenterCrop(size)]
        eval_tf = T.Compose(test + tail)
        return imagenet_train_transform(size, mean, std, augment.hflip), eval_tf
    elif augment.kind == "pad_crop":
        test = [T.Resize(size), T.CenterCrop(size)]
        crop = [T.RandomCrop(size, padding=augment.crop_padding)] if augment.crop_padding else []
        train = [*test, *crop, *flip]
    else:
        raise ConfigError(f"unknown augmentation kind {augment.kind!r}")
    return T.Compose(train + tail), T.Compose(test + tail)


def make_splits(
    *,
    title: str,
    train: list[tuple[str, int]],
    test: list[tuple[str, int]],
    names: list[str],
    size: int,
    base: Path,
    opts: dict[str, Any],
    augment: AugmentSpec | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> RawSplits:
    """RawSplits of two FileImageDatasets (default: the 224 random-resized-crop protocol)."""
    for split, samples in (("training", train), ("test", test)):
        if not samples:
            raise DataError(f"{title}: the {split} split in {base} holds no images")
    if augment is None:
        augment = AugmentSpec("random_resized_crop", crop_size=size, crop_padding=0, hflip=True)
    return RawSplits(
        train=FileImageDataset(train, names),
        test=FileImageDataset(test, names),
        num_classes=len(names),
        in_channels=3,
        image_size=size,
        mean=mean,
        std=std,
        augment=augment,
        class_names=names,
        root=str(base),
        options=opts,
    )


def _unreadable(folder: Path, exc: OSError, what: str) -> DataError:
    reason = " ".join(f"{type(exc).__name__}: {exc.strerror or exc}".split())
    return DataError(
        f"{what} {folder} cannot be read ({reason}); fix its permissions (e.g. chmod -R u+rX) "
        "or remove it"
    )


def list_subfolders(folder: Path, what: str = "folder") -> list[Path]:
    """The sub-folders of ``folder``, sorted; DataError naming it when it cannot be read."""
    try:
        return sorted(Path(e.path) for e in os.scandir(folder) if e.is_dir())
    except OSError as exc:
        raise _unreadable(folder, exc, what) from None


def list_images(folder: Path, recursive: bool = False, what: str = "class folder") -> list[Path]:
    """The image files in ``folder`` (and below with ``recursive``), sorted.

    A folder that cannot be listed (permissions, I/O error) is a DataError naming it and the
    OS error, never silently "no images".
    """
    found: list[Path] = []
    pending = [Path(folder)]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir():
                        if recursive:
                            pending.append(Path(entry.path))
                    elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in (
                        IMAGE_EXTENSIONS
                    ):
                        found.append(Path(entry.path))
        except OSError as exc:
            raise _unreadable(current, exc, what) from None
    return sorted(found)


def _scan(folder: Path) -> dict[str, list[Path]]:
    return {d.name: list_images(d, recursive=True) for d in list_subfolders(folder)}


@DATASETS.register("imagefolder", "image-folder")
def imagefolder(root: str | None = None, **options: Any) -> RawSplits:
    """Image folders root/train/<class>/* and root/val/<class>/* (fine-grained sets, 224 protocol).

    Options: image_size (224), protocol (imagenet | cifar; the cifar protocol pads by 4 pixels,
    change it with augment.crop_padding), train_dir (train), test_dir (val).
    """
    opts = check_options(
        "imagefolder",
        options,
        {"image_size": 224, "protocol": "imagenet", "train_dir": "train", "test_dir": "val"},
    )
    size, protocol = opts["image_size"], opts["protocol"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"data.options.image_size must be a positive integer, got {size!r}")
    if protocol not in ("imagenet", "cifar"):
        raise ConfigError(
            f"data.options.protocol must be 'imagenet' (random-resized-crop) or 'cifar' "
            f"(crop after padding), got {protocol!r}"
        )
    if root is None:
        raise ConfigError(
            "dataset 'imagefolder' needs data.root: the folder holding train/ and val/"
        )
    base = Path(root).expanduser().absolute()
    train_dir, test_dir = base / opts["train_dir"], base / opts["test_dir"]
    for d, key in ((train_dir, "train_dir"), (test_dir, "test_dir")):
        if not d.is_dir():
            raise DataError(
                f"image folder {d} is missing; data.root must contain {opts['train_dir']}/<class>/ "
                f"and {opts['test_dir']}/<class>/ folders (or set data.options.{key})"
            )
    train_classes = _scan(train_dir)
    if not train_classes:
        raise DataError(f"{train_dir} has no class folders; expected {train_dir}/<class>/<image>")
    for name, files in train_classes.items():
        if not files:
            raise DataError(
                f"class folder {train_dir / name} has no images (extensions: "
                f"{' '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
    names = list(train_classes)
    index = {n: i for i, n in enumerate(names)}
    test_classes = _scan(test_dir)
    unknown = [n for n in test_classes if n not in index]
    if unknown:
        raise DataError(
            f"{test_dir / unknown[0]} is a class that {train_dir} lacks; test classes must be a "
            "subset of the training classes (same folder names)"
        )
    train = [(str(p), index[n]) for n, files in train_classes.items() for p in files]
    test = [(str(p), index[n]) for n, files in test_classes.items() for p in files]
    if not test:
        raise DataError(f"{test_dir} holds no images; expected {test_dir}/<class>/<image>")
    if protocol == "imagenet":
        augment = AugmentSpec("random_resized_crop", crop_size=size, crop_padding=0, hflip=True)
    else:
        augment = AugmentSpec("pad_crop", crop_size=size, crop_padding=4, hflip=True)
    return make_splits(
        title="imagefolder",
        train=train,
        test=test,
        names=names,
        size=size,
        base=base,
        opts=opts,
        augment=augment,
    )
