"""MNIST and Fashion-MNIST from raw IDX files (gzipped or not).

Files (http://yann.lecun.com/exdb/mnist/ format): ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
optionally ending in ``.gz``. An IDX file starts with a big-endian int32 magic number (2051 for
uint8 3-D image arrays, 2049 for uint8 1-D label arrays), then one big-endian uint32 per
dimension, then the data. The magic number, the dimensions and the byte count are checked.

Where the files are looked for: ``data.root`` itself, ``root/fashion-mnist`` (``root/mnist``) and
torchvision's ``root/FashionMNIST/raw`` (``root/MNIST/raw``). Without ``data.root``: Fashion-MNIST
uses ``$SELFKD_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist`` (Debian package
dataset-fashion-mnist) when it exists, else ``./data/fashion-mnist``; MNIST uses
``$SELFKD_MNIST``, else ``/usr/share/datasets/mnist`` when it exists, else ``./data/mnist``.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfkd.data.base import ArrayImageDataset, AugmentSpec, RawSplits
from selfkd.data.registry import DATASETS, check_options
from selfkd.errors import DataError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"
MNIST_URL = "http://yann.lecun.com/exdb/mnist/"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic bytes or ends in .gz."""
    gz = path.suffix == ".gz"
    try:
        data = path.read_bytes()
        gz = gz or data[:2] == b"\x1f\x8b"
        return gzip.decompress(data) if gz else data
    except (OSError, EOFError, zlib.error) as exc:
        what = "gzip file (truncated or corrupt?)" if gz else "file"
        raise DataError(
            f"cannot read IDX {what} {path}: {' '.join(str(exc).split())}; re-download it"
        ) from exc


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """The uint8 array stored in IDX file ``path``; DataError naming the file if malformed.

    ``magic`` is the expected magic number: 2051 (images, 3 dimensions) or 2049 (labels, 1).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file {path} is missing; re-download it")
    data = _read_bytes(path)
    ndim = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}[magic]
    kind = "images" if magic == IMAGES_MAGIC else "labels"
    header = 4 + 4 * ndim
    if len(data) < 4:
        raise DataError(f"IDX file {path} is truncated ({len(data)} bytes); re-download it")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(
            f"IDX file {path} has magic number {found}, expected {magic} for an {kind} file; "
            "it is not an IDX file of this kind (swapped images/labels file?)"
        )
    if len(data) < header:
        raise DataError(f"IDX file {path} is truncated inside its header; re-download it")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)  # Python ints: 3 uint32 dimensions cannot overflow
    if len(data) < expected:
        raise DataError(
            f"IDX file {path} is truncated: {len(data)} bytes, expected {expected} for "
            f"dimensions {'×'.join(map(str, dims))}; re-download it"
        )
    if len(data) > expected:
        raise DataError(
            f"IDX file {path} has {len(data) - expected} bytes after the data declared by its "
            f"header ({'×'.join(map(str, dims))}); it is corrupt, re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find(dirs: list[Path], stem: str) -> Path | None:
    names = [stem, stem + ".gz"]
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them t10k-images.idx3-ubyte
    names += [dotted, dotted + ".gz"]
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    return None


def _load(
    title: str, root: Path, dirs: list[Path], url: str, env: str
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Path]:
    """``([(train_images, train_labels), (test_images, test_labels)], folder)``."""
    files: dict[str, Path] = {}
    for split in ("train", "t10k"):
        for kind, code in (("images", 3), ("labels", 1)):
            stem = f"{split}-{kind}-idx{code}-ubyte"
            found = _find(dirs, stem)
            if found is None:
                raise DataError(
                    f"{title} not found: {root / stem}(.gz) is missing; get it with `selfkd data "
                    f"get {title.lower()}` (or data.download: true), or set data.root (or ${env}) "
                    f"to the folder that holds the four IDX files (from {url})"
                )
            files[f"{split}-{kind}"] = found
    out = []
    for split in ("train", "t10k"):
        images = read_idx(files[f"{split}-images"], IMAGES_MAGIC)
        labels = read_idx(files[f"{split}-labels"], LABELS_MAGIC)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{files[f'{split}-images']} holds {images.shape[0]} images but "
                f"{files[f'{split}-labels']} holds {labels.shape[0]} labels; the files do not "
                "belong together, re-download them"
            )
        if labels.size and labels.max() > 9:
            raise DataError(
                f"{files[f'{split}-labels']} has label {int(labels.max())}, expected 0..9; "
                "re-download it"
            )
        out.append(
            (torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
        )
    shapes = {tuple(x.shape[1:]) for x, _ in out}
    if len(shapes) != 1:
        raise DataError(
            f"{title}: train and test images differ in size ({' vs '.join(map(str, shapes))}) "
            f"in {files['train-images'].parent}; re-download the files"
        )
    return out, files["train-images"].parent


def _root(root: str | None, env: str, system: str, local: str) -> Path:
    if root is not None:
        return Path(root).expanduser().absolute()
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser().absolute()
    if Path(system).is_dir():
        return Path(system)
    return Path(local).absolute()


def _splits(title, root, subdirs, url, env, names, mean, std, hflip, padding) -> RawSplits:
    dirs = [root] + [root / s for s in subdirs]
    (train, test), folder = _load(title, root, dirs, url, env)
    size = int(train[0].shape[-1])
    return RawSplits(
        train=ArrayImageDataset(train[0], train[1], names),
        test=ArrayImageDataset(test[0], test[1], names),
        num_classes=len(names),
        in_channels=1,
        image_size=size,
        mean=mean,
        std=std,
        augment=AugmentSpec("pad_crop", crop_size=size, crop_padding=padding, hflip=hflip),
        class_names=names,
        root=str(folder),
        options={},
    )


@DATASETS.register("fashion-mnist", "fashion_mnist", "fmnist")
def fashion_mnist(root: str | None = None, **options: Any) -> RawSplits:
    """Fashion-MNIST: 60,000 train / 10,000 test 28×28 grayscale images, 10 classes (IDX files).

    Default augmentation: crop after 2-pixel zero padding + horizontal flip (clothes are
    left-right symmetric in meaning); normalization 0.2860 / 0.3530 (train-set statistics).
    """
    check_options("fashion-mnist", options, {})
    base = _root(
        root, "SELFKD_FASHION_MNIST", "/usr/share/datasets/fashion-mnist", "data/fashion-mnist"
    )
    return _splits(
        "Fashion-MNIST", base, ["fashion-mnist", "FashionMNIST/raw"], FASHION_MNIST_URL,
        "SELFKD_FASHION_MNIST", FASHION_MNIST_CLASSES, (0.2860,), (0.3530,), True, 2,
    )  # fmt: skip


@DATASETS.register("mnist")
def mnist(root: str | None = None, **options: Any) -> RawSplits:
    """MNIST: 60,000 train / 10,000 test 28×28 grayscale digits, 10 classes (IDX files).

    Default augmentation: crop after 2-pixel zero padding, no flip (digits are not symmetric);
    normalization 0.1307 / 0.3081.
    """
    check_options("mnist", options, {})
    base = _root(root, "SELFKD_MNIST", "/usr/share/datasets/mnist", "data/mnist")
    return _splits(
        "MNIST", base, ["mnist", "MNIST/raw"], MNIST_URL, "SELFKD_MNIST",
        [str(i) for i in range(10)], (0.1307,), (0.3081,), False, 2,
    )  # fmt: skip
