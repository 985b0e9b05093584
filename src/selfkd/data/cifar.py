"""CIFAR-10 and CIFAR-100 from the official "python version" pickles.

Layout (https://www.cs.toronto.edu/~kriz/cifar.html):

* ``cifar-10-batches-py/``: ``data_batch_1`` … ``data_batch_5``, ``test_batch``, ``batches.meta``;
* ``cifar-100-python/``: ``train``, ``test``, ``meta``.

Each file is a pickled dict with bytes keys (``b'data'``: uint8 N×3072, channel-major 3×32×32;
``b'labels'`` or ``b'fine_labels'``/``b'coarse_labels'``; meta: ``b'label_names'`` or
``b'fine_label_names'``/``b'coarse_label_names'``). ``data.root`` may be the folder that contains
``cifar-10-batches-py/`` / ``cifar-100-python/`` or that folder itself; it defaults to
``$SELFKD_DATA`` or ``./data``.

These files are pickles; they are read with a restricted unpickler
(:mod:`selfkd.data.safe_pickle`) that builds only dicts, lists, bytes, numbers and numpy arrays,
so a file that asks for anything else (code) is refused and nothing in it runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfkd.data.base import ArrayImageDataset, AugmentSpec, RawSplits
from selfkd.data.registry import DATASETS, check_options
from selfkd.data.safe_pickle import UnsafePickleError, load_data_pickle
from selfkd.errors import ConfigError, DataError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def default_root(root: str | os.PathLike | None) -> Path:
    """``root``, else ``$SELFKD_DATA``, else ``./data``."""
    if root is None:
        root = os.environ.get("SELFKD_DATA") or "data"
    return Path(root).expanduser().absolute()


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def load_cifar_pickle(path: Path) -> dict[str, Any]:
    """Unpickle one CIFAR file; keys are decoded to str. DataError naming the file on failure."""
    if not path.is_file():
        raise DataError(
            f"CIFAR file {path} is missing; the dataset folder is incomplete, re-extract the "
            f"archive from {CIFAR_URL}"
        )
    try:
        obj = load_data_pickle(path, encoding="bytes")
    except UnsafePickleError as exc:
        raise DataError(
            f"refused to read CIFAR file {path}: {exc}; a genuine CIFAR file never does, so this "
            f"copy was altered: delete the folder and get the dataset again from {CIFAR_URL} "
            "(or `selfkd data get`)"
        ) from None
    except Exception as exc:  # pickle raises many kinds of errors on corrupt input
        raise DataError(
            f"cannot read CIFAR file {path} ({_one_line(exc)}); it is corrupt or truncated, "
            f"re-extract the archive from {CIFAR_URL}"
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(
            f"CIFAR file {path} holds a {type(obj).__name__}, not a dict; it is not in the "
            f"official python format ({CIFAR_URL})"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _key(d: dict[str, Any], key: str, path: Path) -> Any:
    if key not in d:
        raise DataError(
            f"CIFAR file {path} has no b'{key}' entry (found: {', '.join(sorted(d)) or 'none'}); "
            f"it is not in the official python format, re-extract it from {CIFAR_URL}"
        )
    return d[key]


def read_cifar_batch(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 N×3×32×32, labels int64 N)`` from one CIFAR pickle."""
    d = load_cifar_pickle(path)
    data = np.asarray(_key(d, "data", path))
    labels = np.asarray(_key(d, label_key, path))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"CIFAR file {path}: b'data' has shape {data.shape}, expected N×3072; "
            f"re-extract it from {CIFAR_URL}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(
            f"CIFAR file {path}: {data.shape[0]} images but {labels.size} labels in "
            f"b'{label_key}'; re-extract it from {CIFAR_URL}"
        )
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise DataError(f"CIFAR file {path}: pixel values outside 0..255")
        data = data.astype(np.uint8)
    images = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, 3, 32, 32)
    return images, torch.from_numpy(labels.astype(np.int64))


def _names(d: dict[str, Any], key: str, path: Path) -> list[str]:
    raw = _key(d, key, path)
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw]


def _dataset_dir(root: Path, folder: str, probe: str, title: str, name: str) -> Path:
    """``root/folder`` or ``root`` itself if it already is that folder."""
    for cand in (root / folder, root):
        if (cand / probe).is_file():
            return cand
    raise DataError(
        f"{title} not found: {root / folder / probe} is missing; get it with `selfkd data get "
        f"{name} --root {root}` (or data.download: true), or set data.root to the folder that "
        f"contains {folder}/"
    )


def _make(
    d: Path, train: list[tuple], test: tuple, names: list[str], mean, std, options
) -> RawSplits:
    train_x = torch.cat([x for x, _ in train]) if len(train) > 1 else train[0][0]
    train_y = torch.cat([y for _, y in train]) if len(train) > 1 else train[0][1]
    return RawSplits(
        train=ArrayImageDataset(train_x, train_y, names),
        test=ArrayImageDataset(test[0], test[1], names),
        num_classes=len(names),
        in_channels=3,
        image_size=32,
        mean=mean,
        std=std,
        augment=AugmentSpec("pad_crop", crop_size=32, crop_padding=4, hflip=True),
        class_names=names,
        root=str(d),
        options=options,
    )


@DATASETS.register("cifar10", "cifar-10")
def cifar10(root: str | None = None, **options: Any) -> RawSplits:
    """CIFAR-10: 50,000 train / 10,000 test 32×32 RGB images, 10 classes (official pickles)."""
    check_options("cifar10", options, {})
    d = _dataset_dir(
        default_root(root), "cifar-10-batches-py", "data_batch_1", "CIFAR-10", "cifar10"
    )
    names = _names(load_cifar_pickle(d / "batches.meta"), "label_names", d / "batches.meta")
    train = [read_cifar_batch(d / f"data_batch_{i}", "labels") for i in range(1, 6)]
    test = read_cifar_batch(d / "test_batch", "labels")
    return _make(d, train, test, names, CIFAR10_MEAN, CIFAR10_STD, {})


@DATASETS.register("cifar100", "cifar-100")
def cifar100(root: str | None = None, **options: Any) -> RawSplits:
    """CIFAR-100: 50,000 train / 10,000 test 32×32 RGB images, 100 fine (or 20 coarse) classes."""
    opts = check_options("cifar100", options, {"labels": "fine"})
    kind = opts["labels"]
    if kind not in ("fine", "coarse"):
        raise ConfigError(f"data.options.labels must be 'fine' or 'coarse', got {kind!r}")
    d = _dataset_dir(default_root(root), "cifar-100-python", "train", "CIFAR-100", "cifar100")
    names = _names(load_cifar_pickle(d / "meta"), f"{kind}_label_names", d / "meta")
    train = read_cifar_batch(d / "train", f"{kind}_labels")
    test = read_cifar_batch(d / "test", f"{kind}_labels")
    return _make(d, [train], test, names, CIFAR100_MEAN, CIFAR100_STD, opts)
