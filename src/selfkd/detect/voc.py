"""PASCAL VOC detection sets through ``torchvision.datasets.VOCDetection``, layout checked first.

``root`` holds ``VOCdevkit/VOC2007/`` (and ``VOC2012/``), each with ``Annotations/<id>.xml``,
``JPEGImages/<id>.jpg`` and ``ImageSets/Main/<set>.txt``; a set spec is ``YEAR:SET``, several
joined by commas (the paper: ``2007:trainval,2012:trainval`` for training, ``2007:test``).
Items are ``(image 3×H×W float in [0, 1], {"boxes", "labels", "difficult"})``; labels are
1..20 in :data:`VOC_CLASSES` order (0 is the background).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset
from torchvision.datasets import VOCDetection
from torchvision.transforms import functional as TF

from selfkd.errors import ConfigError, DataError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
INDEX = {c: i + 1 for i, c in enumerate(VOC_CLASSES)}


def parse_sets(spec: str) -> list[tuple[str, str]]:
    """``"2007:trainval,2012:trainval"`` -> ``[("2007", "trainval"), ("2012", "trainval")]``."""
    out = []
    for part in spec.split(","):
        year, sep, name = part.strip().partition(":")
        if not sep or not year or not name:
            raise ConfigError(f"VOC set {part!r} must be YEAR:SET, e.g. 2007:trainval")
        out.append((year, name))
    return out


def check_layout(root: str | Path, year: str, image_set: str) -> list[str]:
    """The image ids of a VOC set, after checking every file they need exists."""
    base = Path(root) / "VOCdevkit" / f"VOC{year}"
    listing = base / "ImageSets" / "Main" / f"{image_set}.txt"
    if not listing.is_file():
        raise DataError(
            f"VOC set list {listing} is missing; the root must hold VOCdevkit/VOC{year}/"
            "{Annotations,JPEGImages,ImageSets/Main} as the official tar files extract"
        )
    ids = [ln.split()[0] for ln in listing.read_text().splitlines() if ln.strip()]
    if not ids:
        raise DataError(f"VOC set list {listing} names no images")
    for folder in ("Annotations", "JPEGImages"):
        if not (base / folder).is_dir():
            raise DataError(
                f"VOC folder {base / folder} is missing; extract the full VOC{year} tar"
            )
    for i in ids:
        if not (base / "Annotations" / f"{i}.xml").is_file():
            raise DataError(
                f"VOC annotation {base / 'Annotations' / (i + '.xml')} is missing ({listing} names "
                f"image {i}); re-extract VOC{year} or remove the id from the list"
            )
        if not (base / "JPEGImages" / f"{i}.jpg").is_file():
            raise DataError(f"VOC image {base / 'JPEGImages' / (i + '.jpg')} is missing")
    return ids


def _as_list(x: Any) -> list:
    return x if isinstance(x, list) else [x]


class VOCBoxes(Dataset):
    """One VOC set as (image tensor, target dict); ``flip`` adds a random horizontal flip."""

    def __init__(self, root: str | Path, year: str, image_set: str, flip: bool = False) -> None:
        self.ids = check_layout(root, year, image_set)
        self.voc = VOCDetection(str(root), year=year, image_set=image_set, download=False)
        self.flip = flip
        self.where = f"VOC{year} {image_set}"

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, ann = self.voc[index]
        boxes, labels, difficult = [], [], []
        for obj in _as_list(ann["annotation"].get("object", [])):
            name = obj["name"]
            if name not in INDEX:
                raise DataError(f"{self.where}: unknown VOC class {name!r} in image {index}")
            b = obj["bndbox"]
            boxes.append(
                [float(b["xmin"]) - 1, float(b["ymin"]) - 1, float(b["xmax"]), float(b["ymax"])]
            )
            labels.append(INDEX[name])
            difficult.append(int(obj.get("difficult", 0)))
        x = TF.to_tensor(image)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "difficult": torch.tensor(difficult, dtype=torch.int64),
        }
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
            w = x.shape[-1]
            bx = target["boxes"].clone()
            target["boxes"] = torch.stack([w - bx[:, 2], bx[:, 1], w - bx[:, 0], bx[:, 3]], dim=1)
        return x, target


def voc_sets(root: str | Path, spec: str, flip: bool = False) -> Dataset:
    """The sets of ``spec`` (``YEAR:SET,...``) concatenated."""
    parts = [VOCBoxes(root, y, s, flip) for y, s in parse_sets(spec)]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)
