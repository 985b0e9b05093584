"""One-line errors for malformed dataset files and unreadable folders."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from dataset_writers import jpeg
from selfkd.data import DATASETS
from selfkd.data.idx import read_idx
from selfkd.errors import DataError


def test_idx_header_whose_dimensions_overflow_int64(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    big = 2**32 - 1  # three uint32 dimensions: their product overflows int64
    path.write_bytes(struct.pack(">i", 2051) + struct.pack(">III", big, big, big) + b"\0" * 8)
    with pytest.raises(DataError) as info:
        read_idx(path, 2051)
    message = str(info.value)
    assert "\n" not in message
    assert f"{path} is truncated: 24 bytes, expected {16 + big**3}" in message
    assert f"{big}×{big}×{big}" in message


def _imagefolder(root: Path) -> None:
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            (d / "x.jpg").write_bytes(jpeg(1))


def test_unreadable_class_folder_names_the_folder_and_the_os_error(tmp_path, monkeypatch):
    _imagefolder(tmp_path)
    blocked = tmp_path / "train" / "b"
    real = os.scandir

    def scandir(path="."):
        if Path(path) == blocked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError) as info:
        DATASETS.get("imagefolder")(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "has no images" not in message
    assert message.startswith(f"class folder {blocked} cannot be read")
    assert "PermissionError: Permission denied" in message and "chmod" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their permissions")
def test_unreadable_class_folder_for_real(tmp_path):
    _imagefolder(tmp_path)
    blocked = tmp_path / "train" / "b"
    blocked.chmod(0)
    try:
        with pytest.raises(DataError, match=f"class folder {blocked} cannot be read"):
            DATASETS.get("imagefolder")(str(tmp_path))
    finally:
        blocked.chmod(0o755)


def test_unreadable_caltech_class_folder(tmp_path, monkeypatch):
    base = tmp_path / "101_ObjectCategories"
    for c in ("cat", "dog"):
        (base / c).mkdir(parents=True)
        for j in range(3):
            (base / c / f"image_{j}.jpg").write_bytes(jpeg(j))
    blocked = base / "dog"
    real = os.scandir

    def scandir(path="."):
        if Path(path) == blocked:
            raise OSError(5, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=f"{blocked} cannot be read \\(OSError: Input/output"):
        DATASETS.get("caltech101")(str(tmp_path), train_per_class=1)
