"""Tiny-ImageNet (200 classes, 64×64, 100,000 train / 10,000 val) from its official layout.

Layout (``tiny-imagenet-200.zip``): ``tiny-imagenet-200/wnids.txt`` (one WordNet id per line),
``words.txt`` (optional: ``<wnid>\\t<names>``), ``train/<wnid>/images/*.JPEG``,
``val/val_annotations.txt`` (tab-separated ``<file> <wnid> <x0> <y0> <x1> <y1>``) and
``val/images/*.JPEG``. The unlabelled ``test/`` folder is not used; the labelled val split is the
test set, as in the AI-KD paper (table 1).

Labels are the positions of the wnids sorted by name (the order an ImageFolder of ``train/``
would give). Class names are the first synonym in ``words.txt`` (the wnid is appended when two
classes would share a name), or the wnids when ``words.txt`` is absent.

Tiny-ImageNet is a coarse set, trained like CIFAR (AI-KD §4.2): images resized to ``image_size``
(default 64, the native size; the resize is a no-op there), then a random crop after zero-padding
by 4 pixels (the common Tiny-ImageNet setting; change it with ``data.augment.crop_padding``) and a
horizontal flip; test images are only resized. Normalization uses Tiny-ImageNet's own training-set
statistics, mean (0.4802, 0.4481, 0.3975), std (0.2302, 0.2265, 0.2262), the values used by
common Tiny-ImageNet training code (override with ``data.normalize``).

``data.root`` may be the folder that contains ``tiny-imagenet-200/`` or that folder itself; it
defaults to ``$SELFKD_DATA/tiny-imagenet`` (or ``$SELFKD_DATA``), then ``./data/tiny-imagenet``
(or ``./data``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfkd.data.base import AugmentSpec, RawSplits
from selfkd.data.finegrained import (
    Sample,
    check_image_size,
    check_images,
    locate,
    make_splits,
    read_lines,
)
from selfkd.data.imagefolder import list_images, list_subfolders
from selfkd.data.registry import DATASETS, check_options
from selfkd.errors import DataError

TINY_MEAN = (0.4802, 0.4481, 0.3975)
TINY_STD = (0.2302, 0.2265, 0.2262)
TINY_CROP_PADDING = 4


def _images_in(folder: str) -> list[str]:
    return [p.name for p in list_images(Path(folder), what="image folder")]


@DATASETS.register("tiny-imagenet", "tinyimagenet", "tiny_imagenet")
def tiny_imagenet(root: str | None = None, **options: Any) -> RawSplits:
    """Tiny-ImageNet (200 classes, 100,000/10,000 val) at 64×64, CIFAR-style crop+pad and flip.

    Options: image_size (64).
    """
    title = "Tiny-ImageNet"
    opts = check_options("tiny-imagenet", options, {"image_size": 64})
    size = check_image_size(opts["image_size"])
    base = locate(
        title, "tiny-imagenet", root, ("tiny-imagenet-200", ""), ("wnids.txt", "train", "val")
    )
    hint = "set data.root to the folder that contains tiny-imagenet-200/ (re-extract the zip)"

    wnid_file = base / "wnids.txt"
    wnids = [line for _, line in read_lines(wnid_file, title, "one WordNet id per line", hint)]
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{title}: {wnid_file} lists a WordNet id twice")
    wnids = sorted(wnids)
    index = {w: i for i, w in enumerate(wnids)}

    # class names from words.txt when present
    words: dict[str, str] = {}
    words_file = base / "words.txt"
    if words_file.is_file():
        for _, line in read_lines(words_file, title, "'<wnid>\\t<names>' lines", hint):
            wnid, _, text = line.partition("\t")
            if wnid in index and text.strip():
                words[wnid] = text.split(",")[0].strip()
    first = [words.get(w, w) for w in wnids]
    names = [n if first.count(n) == 1 else f"{n} ({w})" for n, w in zip(first, wnids, strict=True)]

    train_dir = base / "train"
    if not train_dir.is_dir():
        raise DataError(
            f"{title}: {train_dir} is missing; it should hold train/<wnid>/images/*.JPEG; {hint}"
        )
    extra = [d.name for d in list_subfolders(train_dir) if d.name not in index]
    if extra:
        raise DataError(
            f"{title}: {train_dir / extra[0]} is a class folder whose WordNet id {wnid_file} "
            "lacks; wnids.txt and train/ belong to different copies"
        )
    train: list[Sample] = []
    for wnid in wnids:
        folder = train_dir / wnid / "images"
        if not folder.is_dir():
            raise DataError(
                f"{title}: {folder} is missing; every id of wnids.txt needs "
                f"train/<wnid>/images/*.JPEG; {hint}"
            )
        files = _images_in(str(folder))
        if not files:
            raise DataError(f"{title}: {folder} holds no images; {hint}")
        train += [(str(folder / f), index[wnid]) for f in files]

    val_dir = base / "val"
    ann_file = val_dir / "val_annotations.txt"
    what = "tab-separated '<file> <wnid> <x0> <y0> <x1> <y1>' lines"
    test: list[Sample] = []
    listed: set[str] = set()
    for lineno, line in read_lines(ann_file, title, what, hint):
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2:
            raise DataError(f"{title}: {ann_file} line {lineno}: {line!r} is not {what}")
        fname, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in index:
            raise DataError(
                f"{title}: {ann_file} line {lineno}: {fname} has WordNet id {wnid!r}, which "
                f"{wnid_file} lacks"
            )
        if fname in listed:
            raise DataError(f"{title}: {ann_file} line {lineno}: {fname} is listed twice")
        listed.add(fname)
        test.append((str(val_dir / "images" / fname), index[wnid]))
    check_images(title, test, ann_file)
    unlabelled = [f for f in _images_in(str(val_dir / "images")) if f not in listed]
    if unlabelled:
        raise DataError(
            f"{title}: {val_dir / 'images' / unlabelled[0]} has no entry in {ann_file} "
            f"({len(unlabelled)} unlabelled validation images); re-extract the archive"
        )
    augment = AugmentSpec("pad_crop", crop_size=size, crop_padding=TINY_CROP_PADDING, hflip=True)
    return make_splits(
        title=title,
        train=train,
        test=test,
        names=names,
        size=size,
        base=base,
        opts=opts,
        augment=augment,
        mean=TINY_MEAN,
        std=TINY_STD,
    )
