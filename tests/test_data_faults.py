"""Data faults: corrupt image files (error naming the file, or skip and count) and empty classes."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from selfkd.cli import main
from selfkd.config import config_from_dict
from selfkd.data import build_data
from selfkd.data.loader import SkippedImageWarning
from selfkd.errors import DataError

SIZE = 8


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 10), (value, 255 - value, 7)).save(path)


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buf, format="JPEG")
    data = buf.getvalue()
    return data[: len(data) // 2]  # a valid header, then the data stops


def make_tree(
    root: Path, train: dict[str, int], val: dict[str, int], bad: str | None = None
) -> Path | None:
    """root/train/<class>/<i>.png and root/val/<class>/<i>.png; ``bad``: a corrupt train/a/.jpg."""
    for split, counts in (("train", train), ("val", val)):
        for c, (name, n) in enumerate(counts.items()):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _png(root / split / name / f"{i}.png", 20 * c + i)
    if bad is None:
        return None
    path = root / "train" / "a" / "3.jpg"
    path.write_bytes(b"this is not a jpeg" * 10 if bad == "garbage" else _truncated_jpeg())
    return path


def _data(root: Path, **kw):
    kw = {"batch_size": 4, "eval_batch_size": 4, **kw}
    return build_data(name="imagefolder", root=str(root), options={"image_size": SIZE}, **kw)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("bad", ["garbage", "truncated"])
def test_corrupt_image_is_a_one_line_error_naming_the_file(tmp_path, workers, bad):
    path = make_tree(tmp_path, {"a": 3, "b": 3}, {"a": 1, "b": 1}, bad=bad)
    data = _data(tmp_path, workers=workers)
    with pytest.raises(DataError, match=re.escape(f"image {path} cannot be decoded")) as info:
        for _ in data.train_loader.iterate(0):
            pass
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert "replace or delete it, or set data.skip_corrupt=true" in message
    # indexing the dataset directly says the same
    ds = data.train_loader.dataset
    i = next(k for k, (p, _) in enumerate(ds.samples) if p == str(path))
    with pytest.raises(DataError, match=re.escape(str(path))):
        ds[i]


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_corrupt_drops_the_sample_and_counts_it(tmp_path, workers):
    path = make_tree(tmp_path, {"a": 3, "b": 3}, {"a": 1, "b": 1}, bad="garbage")
    data = _data(tmp_path, workers=workers, skip_corrupt=True)
    loader = data.train_loader
    assert data.resolved["skip_corrupt"] is True
    bad_index = next(k for k, (p, _) in enumerate(loader.dataset.samples) if p == str(path))
    with pytest.warns(SkippedImageWarning) as record:
        seen = [idx for _, _, idx in loader.iterate(0)]
    messages = [str(w.message) for w in record]
    assert any(str(path) in m and "1 skipped in this pass" in m for m in messages), messages
    assert any("skipped 1 corrupt image(s) in this pass" in m for m in messages), messages
    indices = torch.cat(seen).tolist()
    assert sorted(indices) == [k for k in range(len(loader.dataset)) if k != bad_index]
    assert (loader.skipped, loader.epoch_skipped) == (1, 1)
    assert list(loader.skipped_files) == [str(path)]
    # the next epoch: counted again; the file is not named again, the pass summary is
    with pytest.warns(SkippedImageWarning) as record:
        n = sum(len(idx) for _, _, idx in loader.iterate(1))
    assert n == len(loader.dataset) - 1
    assert (loader.skipped, loader.epoch_skipped) == (2, 1)
    assert [str(w.message) for w in record] == [
        "train data: skipped 1 corrupt image(s) in this pass, 2 since the start "
        "(1 distinct files; data.skip_corrupt is set)"
    ]


def test_a_batch_of_only_corrupt_images_is_left_out(tmp_path):
    make_tree(tmp_path, {"a": 3, "b": 3}, {"a": 1, "b": 1}, bad="garbage")
    loader = _data(tmp_path, batch_size=1, skip_corrupt=True).train_loader
    with pytest.warns(SkippedImageWarning):
        batches = list(loader.iterate(0))
    assert len(batches) == len(loader) - 1 == 6
    assert loader.skipped == 1


def test_skip_corrupt_is_a_config_key(tmp_path):
    cfg = config_from_dict({"data": {"skip_corrupt": True}})
    assert cfg.data.skip_corrupt is True
    assert config_from_dict({}).data.skip_corrupt is False


def test_corrupt_image_stops_training_with_one_line_error(tmp_path, tiny_dict, capsys):
    path = make_tree(tmp_path / "d", {"a": 3, "b": 3}, {"a": 1, "b": 1}, bad="garbage")
    tiny_dict["data"] = {
        "name": "imagefolder",
        "root": str(tmp_path / "d"),
        "batch_size": 4,
        "eval_batch_size": 4,
        "options": {"image_size": SIZE},
    }
    tiny_dict["train"]["epochs"] = 1
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict))
    assert main(["train", "-c", str(config), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: image ") and str(path) in err, err
    assert "\n" not in err and "data.skip_corrupt=true" in err, err


def test_val_size_that_empties_a_class_is_an_error_naming_it(tmp_path):
    # 7 images: 5 held out, stratified: a 2.14, b 2.14, rare 0.71 -> the spare goes to 'rare'
    make_tree(tmp_path, {"a": 3, "b": 3, "rare": 1}, {"a": 1, "b": 1, "rare": 1})
    with pytest.raises(
        DataError, match=r"class 'rare' has no training images after data.val_size=5"
    ):
        _data(tmp_path, val_size=5)


def test_per_class_after_val_size_names_the_short_class(tmp_path):
    # 8 images, 3 held out: a 1.125, b 1.125, rare 0.75 -> 'rare' keeps 1 of its 2
    make_tree(tmp_path, {"a": 3, "b": 3, "rare": 2}, {"a": 1, "b": 1, "rare": 1})
    with pytest.raises(
        DataError,
        match=r"class 'rare' has only 1 training images after data.val_size=3 but "
        r"data.per_class is 2; lower data.per_class to at most 1 or lower data.val_size",
    ):
        _data(tmp_path, val_size=3, per_class=2)
    data = _data(tmp_path, val_size=3, per_class=1)  # what the message suggests works
    assert data.num_train == 3


def test_per_class_above_a_class_size_names_the_class(tmp_path):
    make_tree(tmp_path, {"a": 3, "b": 1}, {"a": 1, "b": 1})
    with pytest.raises(DataError, match=r"class 'b' has only 1 training images but data.per_"):
        _data(tmp_path, per_class=2)


@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_test_split_without_a_class_warns_naming_it(tmp_path, folder):
    make_tree(tmp_path, {"a": 3, "b": 3, "c": 3}, {"a": 1})
    if folder == "empty":
        (tmp_path / "val" / "c").mkdir()
    with pytest.warns(UserWarning, match=r"the test split has no images of classes 'b', 'c'"):
        data = _data(tmp_path)
    assert data.num_classes == 3


def test_validation_split_without_a_class_warns_naming_it(tmp_path):
    # 3 classes, 2 held out: the spare quota goes to the lower class indices
    make_tree(tmp_path, {"a": 3, "b": 3, "c": 3}, {"a": 1, "b": 1, "c": 1})
    with pytest.warns(UserWarning, match=r"validation split \(data.val_size=2\) has no images "):
        data = _data(tmp_path, val_size=2)
    assert data.resolved["sizes"]["val"] == 2
