"""Fine-grained image sets read from their official layouts (AI-KD paper, table 1).

Entries (all :class:`~selfkd.data.imagefolder.FileImageDataset` splits, RGB, 0-based labels
shared by train and test, ImageNet normalization, the CS-KD fine-grained protocol at
``image_size`` (default 224): RandomResizedCrop + flip for training, Resize(256)/CenterCrop(224)
for test; see :func:`~selfkd.data.imagefolder.build_file_transforms`):

* ``cub200`` — CUB-200-2011, ``CUB_200_2011/``: ``images.txt`` (``<id> <path>``),
  ``train_test_split.txt`` (``<id> <1 train | 0 test>``), ``image_class_labels.txt``
  (``<id> <class 1..200>``), ``classes.txt`` (``<class> <NNN.name>``), ``images/<path>``.
  200 classes, 5,994 train / 5,794 test. Class names drop the ``NNN.`` prefix.
* ``stanford-dogs`` — Stanford Dogs: ``train_list.mat`` / ``test_list.mat`` (MATLAB files with
  ``file_list``, a cell array of paths relative to ``Images/``, and ``labels``, 1-based) and
  ``Images/<wnid>-<breed>/*.jpg``. 120 classes, 12,000 / 8,580. Class names are the breed part
  of the folder names. Reading the ``.mat`` files needs scipy.
* ``mit67`` — MIT Indoor-67: ``TrainImages.txt`` / ``TestImages.txt`` (``<class>/<file>`` relative
  to ``Images/``). 67 classes (sorted by name), 5,360 / 1,340.
* ``fgvc-aircraft`` — FGVC-Aircraft 2013b, ``fgvc-aircraft-2013b/data/``:
  ``images_<annotation>_<split>.txt`` (``<image id> <name, may contain spaces>``),
  ``images/<id>.jpg`` and the class lists ``variants.txt`` / ``families.txt`` /
  ``manufacturers.txt`` (their order gives the labels; without them the sorted names of the
  training split). Option ``annotation``: variant (100 classes, default) | family (70) |
  manufacturer (30). Option ``split``: the training split, ``trainval`` (default, 6,667 images)
  or ``train`` (3,334); the test split is always ``test`` (3,333). The AI-KD paper lists
  6,667 train / 3,334 valid images: 6,667 is exactly trainval (train 3,334 + val 3,333), so the
  paper trains on trainval and evaluates on the 3,333-image test split (its "3,334" matches no
  split that is disjoint from trainval and is taken to be a typo). Images are used whole
  (the 20-pixel copyright banner at the bottom is not cropped).
* ``caltech101`` — Caltech-101, ``101_ObjectCategories/<class>/*.jpg``. There is no official
  split: following the usual protocol each class contributes ``train_per_class`` (default 30)
  training images drawn at random (seeded by ``split_seed`` and the class name, so one class's
  split does not depend on the others) and all its remaining images to the test set
  (optionally capped at ``test_per_class``). ``BACKGROUND_Google`` (clutter, not an object
  class) is excluded unless ``include_background: true``: 101 classes (sorted by name),
  3,030 train / 5,647 test with the defaults.

``data.root`` may be the folder that contains the dataset folder (``CUB_200_2011/`` …) or that
folder itself; it defaults to ``$SELFKD_DATA/<name>`` (or ``$SELFKD_DATA``) and then
``./data/<name>`` (or ``./data``). A missing or malformed file, a list entry whose image does
not exist, or an image without a split or label entry is a :class:`~selfkd.errors.DataError`
naming the file. ``selfkd data get NAME`` (or ``data.download: true``) downloads a dataset
with its official checksums (:mod:`selfkd.data.download`).
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfkd.data.base import RawSplits
from selfkd.data.imagefolder import (
    list_images,
    list_subfolders,
    make_splits,
)
from selfkd.data.registry import DATASETS, check_options
from selfkd.errors import ConfigError, DataError

Sample = tuple[str, int]


# --------------------------------------------------------------------------------------------
# shared helpers (also used by selfkd.data.tinyimagenet)
# --------------------------------------------------------------------------------------------
def candidate_bases(root: str | os.PathLike | None, name: str) -> list[Path]:
    """Where the dataset may be: ``root``, else ``$SELFKD_DATA[/name]``, then ``./data[/name]``."""
    if root is not None:
        return [Path(root).expanduser().absolute()]
    bases = []
    env = os.environ.get("SELFKD_DATA")
    for base in ([Path(env)] if env else []) + [Path("data")]:
        base = base.expanduser().absolute()
        bases += [base / name, base]
    return bases


def locate(
    title: str,
    name: str,
    root: str | os.PathLike | None,
    folders: Sequence[str],
    probes: Sequence[str],
) -> Path:
    """The dataset folder: the first ``base/folder`` (``""`` = base) holding one of ``probes``."""
    bases = candidate_bases(root, name)
    for base in bases:
        for folder in folders:
            cand = base / folder if folder else base
            if any((cand / p).exists() for p in probes):
                return cand
    main = folders[0] or "."
    where = bases[0] / folders[0] / probes[0]
    default = "" if root is not None else " (data.root unset: looked in $SELFKD_DATA and ./data)"
    raise DataError(
        f"{title} not found: {where} is missing{default}; get it with `selfkd data get {name}` "
        f"(or data.download: true), or set data.root to the folder that contains {main}/ (or to "
        "that folder itself)"
    )


def read_lines(path: Path, title: str, what: str, hint: str) -> list[tuple[int, str]]:
    """``(line number, stripped line)`` for the non-empty lines of a text file."""
    if not path.is_file():
        raise DataError(f"{title}: {path} is missing; it should contain {what}; {hint}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{title}: cannot read {path} ({' '.join(str(exc).split())})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{title}: {path} is empty; it should contain {what}; {hint}")
    return lines


def check_images(title: str, samples: Iterable[Sample], listed_in: Path) -> None:
    """DataError for the first sample whose image file does not exist."""
    for path, _ in samples:
        if not os.path.isfile(path):
            raise DataError(
                f"{title}: {listed_in} refers to image {path}, which does not exist; the image "
                "folder is incomplete or belongs to another version (re-extract the archive)"
            )


def check_image_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"data.options.image_size must be a positive integer, got {size!r}")
    return size


def _int(text: str, path: Path, lineno: int, title: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(
            f"{title}: {path} line {lineno}: {text!r} is not an integer; each line should be {what}"
        ) from None


def _id_table(path: Path, title: str, what: str, hint: str, value_int: bool) -> dict[int, Any]:
    """``{id: value}`` from lines ``<id> <value>``; DataError on a malformed or repeated id."""
    table: dict[int, Any] = {}
    for lineno, line in read_lines(path, title, what, hint):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{title}: {path} line {lineno}: {line!r} is not {what}")
        key = _int(parts[0], path, lineno, title, what)
        if key in table:
            raise DataError(f"{title}: {path} line {lineno}: id {key} is listed twice")
        table[key] = _int(parts[1], path, lineno, title, what) if value_int else parts[1]
    return table


# --------------------------------------------------------------------------------------------
# CUB-200-2011
# --------------------------------------------------------------------------------------------
@DATASETS.register("cub200", "cub-200-2011", "cub")
def cub200(root: str | None = None, **options: Any) -> RawSplits:
    """CUB-200-2011 birds (200 classes, 5,994/5,794) from CUB_200_2011/, 224 protocol.

    Options: image_size (224).
    """
    title = "CUB-200-2011"
    opts = check_options("cub200", options, {"image_size": 224})
    size = check_image_size(opts["image_size"])
    base = locate(title, "cub200", root, ("CUB_200_2011", ""), ("images.txt", "images"))
    hint = "set data.root to the folder that contains CUB_200_2011/ (re-extract CUB_200_2011.tgz)"

    images = _id_table(base / "images.txt", title, "'<image id> <path under images/>'", hint, False)
    split = _id_table(
        base / "train_test_split.txt", title, "'<image id> <1 train | 0 test>'", hint, True
    )
    labels = _id_table(
        base / "image_class_labels.txt", title, "'<image id> <class id 1..200>'", hint, True
    )
    class_file = base / "classes.txt"
    class_table = _id_table(class_file, title, "'<class id> <NNN.name>'", hint, False)
    k = len(class_table)
    if sorted(class_table) != list(range(1, k + 1)):
        raise DataError(f"{title}: {class_file} must number its classes 1..{k} without gaps")
    names = [re.sub(r"^\d+\.", "", class_table[i]) for i in range(1, k + 1)]

    for table, path in ((split, "train_test_split.txt"), (labels, "image_class_labels.txt")):
        for image_id in table:
            if image_id not in images:
                raise DataError(
                    f"{title}: {base / path} lists image id {image_id}, which images.txt lacks"
                )
    train: list[Sample] = []
    test: list[Sample] = []
    for image_id, rel in images.items():
        for table, path in ((split, "train_test_split.txt"), (labels, "image_class_labels.txt")):
            if image_id not in table:
                raise DataError(
                    f"{title}: image id {image_id} ({rel}) has no entry in {base / path}; "
                    "every image of images.txt needs one"
                )
        if split[image_id] not in (0, 1):
            raise DataError(
                f"{title}: {base / 'train_test_split.txt'}: image id {image_id} has split "
                f"{split[image_id]}; use 1 (train) or 0 (test)"
            )
        label = labels[image_id]
        if not 1 <= label <= k:
            raise DataError(
                f"{title}: {base / 'image_class_labels.txt'}: image id {image_id} has class "
                f"{label}, outside the 1..{k} of classes.txt"
            )
        (train if split[image_id] else test).append((str(base / "images" / rel), label - 1))
    check_images(title, train + test, base / "images.txt")
    return make_splits(
        title=title, train=train, test=test, names=names, size=size, base=base, opts=opts
    )


# --------------------------------------------------------------------------------------------
# Stanford Dogs
# --------------------------------------------------------------------------------------------
def _mat_strings(value: Any) -> list[str]:
    """Flatten a loadmat cell array (nested object arrays of 1-element string arrays)."""
    out: list[str] = []
    for item in np.asarray(value, dtype=object).reshape(-1):
        if isinstance(item, np.ndarray):
            if item.dtype == object or item.size != 1:
                inner = _mat_strings(item)
                if len(inner) != 1:
                    raise ValueError(f"a cell holds {len(inner)} strings")
                out.append(inner[0])
            else:
                out.append(str(item.reshape(-1)[0]))
        elif isinstance(item, bytes):
            out.append(item.decode("utf-8"))
        else:
            out.append(str(item))
    return out


def _read_dogs_list(path: Path, images: Path, title: str, hint: str) -> list[Sample]:
    if not path.is_file():
        raise DataError(
            f"{title}: {path} is missing; it should be the official MATLAB list with file_list "
            f"(paths under Images/) and labels (1..120); {hint}"
        )
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(
            f"{title}: reading {path.name} needs scipy; pip install 'selfkd[datasets]' (or scipy)"
        ) from None
    try:
        mat = loadmat(str(path))
    except Exception as exc:  # scipy raises several kinds of errors on corrupt files
        raise DataError(
            f"{title}: cannot read {path} ({' '.join(f'{type(exc).__name__}: {exc}'.split())}); "
            f"it should be a MATLAB file with file_list and labels; {hint}"
        ) from exc
    for key in ("file_list", "labels"):
        if key not in mat:
            found = ", ".join(k for k in sorted(mat) if not k.startswith("__")) or "none"
            raise DataError(
                f"{title}: {path} has no {key!r} variable (found: {found}); it should hold "
                f"file_list and labels; {hint}"
            )
    try:
        files = _mat_strings(mat["file_list"])
        raw = np.asarray(mat["labels"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{title}: {path}: file_list must be a cell array of paths and labels a numeric "
            f"vector ({exc})"
        ) from exc
    if len(files) != raw.size:
        raise DataError(f"{title}: {path} has {len(files)} files but {raw.size} labels")
    if raw.size and (np.any(raw != np.round(raw)) or raw.min() < 1):
        raise DataError(f"{title}: {path}: labels must be integers starting at 1")
    return [(str(images / f), int(y) - 1) for f, y in zip(files, raw, strict=True)]


def _breed(path: str) -> str:
    folder = Path(path).parent.name
    return folder.split("-", 1)[1] if re.match(r"^n\d+-.", folder) else folder


@DATASETS.register("stanford-dogs", "stanford_dogs", "dogs")
def stanford_dogs(root: str | None = None, **options: Any) -> RawSplits:
    """Stanford Dogs (120 breeds, 12,000/8,580) from train_list.mat/test_list.mat, 224 protocol.

    Options: image_size (224). Needs scipy to read the .mat lists.
    """
    title = "Stanford Dogs"
    opts = check_options("stanford-dogs", options, {"image_size": 224})
    size = check_image_size(opts["image_size"])
    base = locate(
        title,
        "stanford-dogs",
        root,
        ("StanfordDogs", "stanford_dogs", "stanford-dogs", ""),
        ("train_list.mat", "test_list.mat", "Images"),
    )
    hint = (
        "set data.root to the folder holding Images/, train_list.mat and test_list.mat "
        "(images.tar and lists.tar extracted side by side)"
    )
    images = base / "Images"
    train = _read_dogs_list(base / "train_list.mat", images, title, hint)
    test = _read_dogs_list(base / "test_list.mat", images, title, hint)
    k = max(y for _, y in train + test) + 1 if train or test else 0
    names: list[str | None] = [None] * k
    for path, y in train + test:
        breed = _breed(path)
        if names[y] is None:
            names[y] = breed
        elif names[y] != breed:
            raise DataError(
                f"{title}: label {y + 1} is given to images of both {names[y]!r} and {breed!r} "
                f"(e.g. {path}); the lists in {base} are inconsistent"
            )
    class_names = [n if n is not None else f"class_{i + 1}" for i, n in enumerate(names)]
    check_images(title, train, base / "train_list.mat")
    check_images(title, test, base / "test_list.mat")
    return make_splits(
        title=title, train=train, test=test, names=class_names, size=size, base=base, opts=opts
    )


# --------------------------------------------------------------------------------------------
# MIT Indoor-67
# --------------------------------------------------------------------------------------------
@DATASETS.register("mit67", "mit-indoor-67", "indoor67")
def mit67(root: str | None = None, **options: Any) -> RawSplits:
    """MIT Indoor-67 scenes (67 classes, 5,360/1,340) from TrainImages.txt/TestImages.txt, 224.

    Options: image_size (224).
    """
    title = "MIT67"
    opts = check_options("mit67", options, {"image_size": 224})
    size = check_image_size(opts["image_size"])
    base = locate(
        title,
        "mit67",
        root,
        ("indoorCVPR_09", "MIT67", "mit67", ""),
        ("TrainImages.txt", "TestImages.txt", "Images"),
    )
    hint = (
        "set data.root to the folder holding Images/ (indoorCVPR_09.tar), TrainImages.txt "
        "and TestImages.txt"
    )
    what = "one '<class>/<file>' path under Images/ per line"
    lists: dict[str, list[tuple[str, str]]] = {}
    for split, fname in (("train", "TrainImages.txt"), ("test", "TestImages.txt")):
        path = base / fname
        entries = []
        for lineno, line in read_lines(path, title, what, hint):
            rel = line.replace("\\", "/")
            if "/" not in rel.strip("/"):
                raise DataError(f"{title}: {path} line {lineno}: {line!r} is not {what}")
            entries.append((rel.strip("/").split("/", 1)[0], rel))
        lists[split] = entries
    names = sorted({c for c, _ in lists["train"]})
    index = {n: i for i, n in enumerate(names)}
    for c, rel in lists["test"]:
        if c not in index:
            raise DataError(
                f"{title}: {base / 'TestImages.txt'} lists {rel} of class {c!r}, which "
                "TrainImages.txt lacks; test classes must be training classes"
            )
    images = base / "Images"
    train = [(str(images / rel), index[c]) for c, rel in lists["train"]]
    test = [(str(images / rel), index[c]) for c, rel in lists["test"]]
    check_images(title, train, base / "TrainImages.txt")
    check_images(title, test, base / "TestImages.txt")
    return make_splits(
        title=title, train=train, test=test, names=names, size=size, base=base, opts=opts
    )


# --------------------------------------------------------------------------------------------
# FGVC-Aircraft
# --------------------------------------------------------------------------------------------
_AIRCRAFT_CLASS_FILES = {
    "variant": "variants.txt",
    "family": "families.txt",
    "manufacturer": "manufacturers.txt",
}


@DATASETS.register("fgvc-aircraft", "aircraft", "fgvc_aircraft")
def fgvc_aircraft(root: str | None = None, **options: Any) -> RawSplits:
    """FGVC-Aircraft 2013b (100 variants, trainval 6,667/test 3,333), 224 protocol.

    Options: image_size (224), split (trainval | train: the training split; the test split is
    always test), annotation (variant | family | manufacturer).
    """
    title = "FGVC-Aircraft"
    opts = check_options(
        "fgvc-aircraft",
        options,
        {"image_size": 224, "split": "trainval", "annotation": "variant"},
    )
    size = check_image_size(opts["image_size"])
    if opts["split"] not in ("trainval", "train"):
        raise ConfigError(
            f"data.options.split must be 'trainval' (train + val, 6,667 images, the paper's "
            f"setting) or 'train' (3,334 images), got {opts['split']!r}"
        )
    annotation = opts["annotation"]
    if annotation not in _AIRCRAFT_CLASS_FILES:
        raise ConfigError(
            "data.options.annotation must be 'variant', 'family' or 'manufacturer', "
            f"got {annotation!r}"
        )
    base = locate(
        title,
        "fgvc-aircraft",
        root,
        ("fgvc-aircraft-2013b/data", "data", ""),
        (f"images_{annotation}_test.txt", "images"),
    )
    hint = "set data.root to the folder that contains fgvc-aircraft-2013b/ (re-extract the archive)"
    what = f"'<image id> <{annotation} name>' per line"
    splits: dict[str, list[tuple[str, str]]] = {}
    for split in (opts["split"], "test"):
        path = base / f"images_{annotation}_{split}.txt"
        entries = []
        seen: set[str] = set()
        for lineno, line in read_lines(path, title, what, hint):
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise DataError(f"{title}: {path} line {lineno}: {line!r} is not {what}")
            if parts[0] in seen:
                raise DataError(f"{title}: {path} line {lineno}: image {parts[0]} is listed twice")
            seen.add(parts[0])
            entries.append((parts[0], parts[1].strip()))
        splits[split] = entries
    train_ids = {i for i, _ in splits[opts["split"]]}
    overlap = [i for i, _ in splits["test"] if i in train_ids]
    if overlap:
        raise DataError(
            f"{title}: image {overlap[0]} is in both the {opts['split']} and the test split "
            f"({len(overlap)} shared images); the split files in {base} are inconsistent"
        )
    class_file = base / _AIRCRAFT_CLASS_FILES[annotation]
    if class_file.is_file():
        names = [line for _, line in read_lines(class_file, title, f"{annotation} names", hint)]
        if len(set(names)) != len(names):
            raise DataError(f"{title}: {class_file} lists a class twice")
    else:
        names = sorted({n for _, n in splits[opts["split"]]})
    index = {n: i for i, n in enumerate(names)}
    out: dict[str, list[Sample]] = {}
    for split, entries in splits.items():
        path = base / f"images_{annotation}_{split}.txt"
        for image_id, name in entries:
            if name not in index:
                source = class_file if class_file.is_file() else "the training split"
                raise DataError(
                    f"{title}: {path}: image {image_id} has {annotation} {name!r}, which "
                    f"{source} lacks"
                )
        out[split] = [(str(base / "images" / f"{i}.jpg"), index[n]) for i, n in entries]
        check_images(title, out[split], path)
    return make_splits(
        title=title,
        train=out[opts["split"]],
        test=out["test"],
        names=names,
        size=size,
        base=base,
        opts=opts,
    )


# --------------------------------------------------------------------------------------------
# Caltech-101
# --------------------------------------------------------------------------------------------
CALTECH_BACKGROUND = "BACKGROUND_Google"


def _image_files(folder: Path) -> list[Path]:
    return list_images(folder)


def _locate_caltech(root: str | None) -> Path:
    folders = ("101_ObjectCategories", "caltech101/101_ObjectCategories",
               "caltech-101/101_ObjectCategories")  # fmt: skip
    bases = candidate_bases(root, "caltech101")
    for base in bases:
        for folder in folders:
            if (base / folder).is_dir():
                return base / folder
    # the dataset folder itself (possibly renamed): class folders holding images
    if root is not None and bases[0].is_dir():
        for d in list_subfolders(bases[0], "dataset folder"):
            if _image_files(d):
                return bases[0]
    raise DataError(
        f"Caltech-101 not found: {bases[0] / folders[0]} is missing; get it with `selfkd data get "
        f"caltech101` (or data.download: true), or set data.root to the folder that contains "
        f"{folders[0]}/ or to that folder"
    )


@DATASETS.register("caltech101", "caltech-101")
def caltech101(root: str | None = None, **options: Any) -> RawSplits:
    """Caltech-101 (101 classes; seeded split, 30 train per class, rest test), 224 protocol.

    Options: image_size (224), train_per_class (30), test_per_class (null = all remaining),
    split_seed (0), include_background (false: BACKGROUND_Google is left out).
    """
    title = "Caltech-101"
    opts = check_options(
        "caltech101",
        options,
        {
            "image_size": 224,
            "train_per_class": 30,
            "test_per_class": None,
            "split_seed": 0,
            "include_background": False,
        },
    )
    size = check_image_size(opts["image_size"])
    n_train, n_test, seed = opts["train_per_class"], opts["test_per_class"], opts["split_seed"]
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ConfigError(
            f"data.options.train_per_class must be a positive integer, got {n_train!r}"
        )
    if n_test is not None and (
        isinstance(n_test, bool) or not isinstance(n_test, int) or n_test < 1
    ):
        raise ConfigError(
            f"data.options.test_per_class must be a positive integer or null, got {n_test!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"data.options.split_seed must be an integer, got {seed!r}")
    if not isinstance(opts["include_background"], bool):
        raise ConfigError(
            f"data.options.include_background must be true or false, "
            f"got {opts['include_background']!r}"
        )
    base = _locate_caltech(root)
    folders = list_subfolders(base, "dataset folder")
    if not opts["include_background"]:
        folders = [d for d in folders if d.name != CALTECH_BACKGROUND]
    if not folders:
        raise DataError(f"{title}: {base} has no class folders; expected {base}/<class>/*.jpg")
    names = [d.name for d in folders]
    train: list[Sample] = []
    test: list[Sample] = []
    for label, folder in enumerate(folders):
        files = _image_files(folder)
        if len(files) <= n_train:
            raise DataError(
                f"{title}: class folder {folder} has {len(files)} images, but "
                f"train_per_class={n_train} needs at least {n_train + 1} (one left for test); "
                "lower data.options.train_per_class or restore the folder"
            )
        gen = torch.Generator().manual_seed(
            (seed * 1_000_003 + zlib.crc32(folder.name.encode("utf-8"))) % (2**63)
        )
        order = torch.randperm(len(files), generator=gen).tolist()
        chosen = sorted(order[:n_train])
        rest = sorted(order[n_train:] if n_test is None else order[n_train : n_train + n_test])
        train += [(str(files[i]), label) for i in chosen]
        test += [(str(files[i]), label) for i in rest]
    return make_splits(
        title=title, train=train, test=test, names=names, size=size, base=base, opts=opts
    )
