"""ImageNet (ILSVRC-2012) in its standard folder layout: dataset ``imagenet``.

``data.root`` holds ``train/<wnid>/*.JPEG`` and the validation images in one of two layouts:

* ``val/<wnid>/*.JPEG`` (sorted into class folders, e.g. by the usual ``valprep.sh``), or
* ``val/ILSVRC2012_val_00000001.JPEG`` … flat, labelled by the devkit: ``data.root/
  ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID per
  line, line i for image i) with ``meta.mat`` beside it (ILSVRC2012_ID → wnid; needs scipy), or
  by ``data.options.val_labels``: a text file of ``<image file name> <wnid>`` lines (a CSV such as
  Kaggle's ``LOC_val_solution.csv``, ``ImageId,PredictionString`` with the wnid first, also works).

Classes are the training folders' wnids, sorted (torchvision's order). ImageNet needs a login at
image-net.org, so it is never downloaded: ``selfkd data get imagenet`` says where to put it.
Training augmentation (PS-KD §4.2): random-resized crop, flip, colour jitter and PCA lighting
(:mod:`selfkd.data.lighting`; option ``augment: jitter_lighting``, or ``random_resized_crop``
for crop + flip only); test: resize to 256 (size·8/7) and center crop.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from selfkd.data.base import AugmentSpec, RawSplits
from selfkd.data.imagefolder import (
    IMAGE_EXTENSIONS,
    JITTER_LIGHTING,
    list_images,
    list_subfolders,
    make_splits,
)
from selfkd.data.registry import DATASETS, check_options
from selfkd.errors import ConfigError, DataError

DEVKIT = Path("ILSVRC2012_devkit_t12") / "data"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
LAYOUT = (
    "data.root must hold train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (or a flat val/ with the "
    f"devkit in {DEVKIT.parent}/ or data.options.val_labels)"
)
_NUMBER = re.compile(r"(\d+)\.[A-Za-z]+$")


def devkit_wnids(meta: Path) -> dict[int, str]:
    """ILSVRC2012_ID → wnid of the 1000 leaf synsets in the devkit's ``meta.mat``."""
    try:
        from scipy import io as sio
    except ImportError:
        raise ConfigError(
            "reading the ImageNet devkit's meta.mat needs scipy: pip install 'selfkd[datasets]' "
            "(or pass data.options.val_labels)"
        ) from None
    try:
        synsets = sio.loadmat(str(meta), squeeze_me=True)["synsets"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"cannot read {meta} ({type(exc).__name__}): use the devkit's own meta.mat"
        ) from None
    out = {}
    for row in synsets:
        ident, wnid, num_children = int(row[0]), str(row[1]), int(row[4])
        if num_children == 0:
            out[ident] = wnid
    return out


def _devkit_labels(root: Path, files: list[Path]) -> dict[str, str]:
    folder = root / DEVKIT
    truth, meta = folder / GROUND_TRUTH, folder / "meta.mat"
    ids = devkit_wnids(meta)
    try:
        lines = [ln.strip() for ln in truth.read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise DataError(f"cannot read {truth} ({exc.strerror or exc})") from None
    out = {}
    for f in files:
        m = _NUMBER.search(f.name)
        if m is None or not 1 <= int(m.group(1)) <= len(lines):
            raise DataError(
                f"validation image {f.name} has no line in {truth} ({len(lines)} lines); "
                "flat val/ images must be the official ILSVRC2012_val_<number>.JPEG files"
            )
        ident = int(lines[int(m.group(1)) - 1])
        if ident not in ids:
            raise DataError(f"{truth} names ILSVRC2012_ID {ident}, which {meta} does not list")
        out[f.name] = ids[ident]
    return out


def _file_labels(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(
            f"cannot read data.options.val_labels {path} ({exc.strerror or exc})"
        ) from None
    out = {}
    first = text.splitlines()[0] if text.strip() else ""
    if "," in first:
        for row in csv.reader(text.splitlines()):
            if len(row) >= 2 and row[1].strip() and not row[0].lower().startswith("imageid"):
                out[row[0].strip()] = row[1].split()[0]
    else:
        for ln in text.splitlines():
            parts = ln.split()
            if len(parts) >= 2:
                out[parts[0]] = parts[1]
    return out


def _flat_val(base: Path, val: Path, files: list[Path], labels_file: str | None) -> dict[str, str]:
    if labels_file is not None:
        labels = _file_labels(Path(labels_file).expanduser())
    elif (base / DEVKIT / GROUND_TRUTH).is_file() and (base / DEVKIT / "meta.mat").is_file():
        labels = _devkit_labels(base, files)
    else:
        raise DataError(
            f"ImageNet {val} holds images but no validation labels: put the devkit's data/meta.mat "
            f"and data/{GROUND_TRUTH} in {base / DEVKIT.parent}/, set data.options.val_labels to a "
            "file of '<image> <wnid>' lines, or sort val/ into val/<wnid>/ folders"
        )
    out = {}
    for f in files:
        stem_match = labels.get(f.name, labels.get(f.stem))
        if stem_match is None:
            raise DataError(f"validation image {f.name} has no label in the validation labels")
        out[f.name] = stem_match
    return out


@DATASETS.register("imagenet", "ilsvrc2012")
def imagenet(root: str | None = None, **options: Any) -> RawSplits:
    """ImageNet ILSVRC-2012: root/train/<wnid>/, root/val/ (class folders, or flat + devkit labels).

    Options: image_size (224), augment (jitter_lighting | random_resized_crop), val_labels (a
    file of '<image> <wnid>' lines for a flat val/; default: the devkit in the root).
    """
    opts = check_options(
        "imagenet", options, {"image_size": 224, "augment": "jitter_lighting", "val_labels": None}
    )
    size = opts["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"data.options.image_size must be a positive integer, got {size!r}")
    kinds = {"jitter_lighting": JITTER_LIGHTING, "random_resized_crop": "random_resized_crop"}
    if opts["augment"] not in kinds:
        raise ConfigError(
            f"data.options.augment must be jitter_lighting or random_resized_crop, got "
            f"{opts['augment']!r}"
        )
    if root is None:
        raise ConfigError(f"dataset 'imagenet' needs data.root: {LAYOUT}")
    base = Path(root).expanduser().absolute()
    train_dir, val_dir = base / "train", base / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise DataError(f"ImageNet folder {d} is missing; {LAYOUT}")
    wnids = [d.name for d in list_subfolders(train_dir, "ImageNet training folder")]
    if not wnids:
        raise DataError(f"{train_dir} has no class folders; {LAYOUT}")
    index = {w: i for i, w in enumerate(wnids)}
    train = []
    for w in wnids:
        files = list_images(train_dir / w)
        if not files:
            raise DataError(
                f"class folder {train_dir / w} has no images ({' '.join(IMAGE_EXTENSIONS)})"
            )
        train.extend((str(p), index[w]) for p in files)
    val_classes = list_subfolders(val_dir, "ImageNet validation folder")
    flat = list_images(val_dir)
    if val_classes and flat:
        raise DataError(
            f"{val_dir} mixes class folders and loose images; use one layout: val/<wnid>/ or flat"
        )
    test: list[tuple[str, int]] = []
    if val_classes:
        for d in val_classes:
            if d.name not in index:
                raise DataError(f"{d} is a class that {train_dir} lacks (wnid {d.name})")
            test.extend((str(p), index[d.name]) for p in list_images(d))
    elif flat:
        labels = _flat_val(base, val_dir, flat, opts["val_labels"])
        for f in flat:
            wnid = labels[f.name]
            if wnid not in index:
                raise DataError(
                    f"validation image {f.name} is labelled {wnid}, not a class of {train_dir}"
                )
            test.append((str(f), index[wnid]))
    augment = AugmentSpec(kinds[opts["augment"]], crop_size=size, crop_padding=0, hflip=True)
    return make_splits(
        title="imagenet", train=train, test=test, names=wnids, size=size, base=base, opts=opts,
        augment=augment,
    )  # fmt: skip
