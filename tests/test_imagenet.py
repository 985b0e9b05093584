"""ImageNet reader on generated trees (both validation layouts), PCA lighting, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfkd.cli import main
from selfkd.data import build_data
from selfkd.data.imagenet import DEVKIT, GROUND_TRUTH, imagenet
from selfkd.data.lighting import IMAGENET_EIGVAL, IMAGENET_EIGVEC, Lighting
from selfkd.errors import ConfigError, DataError

WNIDS = ["n01440764", "n01443537", "n01484850"]


def _img(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), value, dtype=np.uint8)).save(path)


def _train(root: Path) -> None:
    for c, w in enumerate(WNIDS):
        for i in range(2):
            _img(root / "train" / w / f"{w}_{i}.JPEG", 40 * c + i)


def _flat_val(root: Path, labels: list[int]) -> None:
    for i, _ in enumerate(labels, start=1):
        _img(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", 7 * i)


def _devkit(root: Path, truth: list[int]) -> None:
    sio = pytest.importorskip("scipy.io")
    folder = root / DEVKIT
    folder.mkdir(parents=True)
    # devkit ids are not the sorted order: id 1 -> WNIDS[2], id 2 -> WNIDS[0], id 3 -> WNIDS[1];
    # id 4 is an inner node (num_children > 0) and must be ignored
    rows = [(1, WNIDS[2], 0), (2, WNIDS[0], 0), (3, WNIDS[1], 0), (4, "n00001740", 5)]
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
             ("num_children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]  # fmt: skip
    synsets = np.array([(i, w, "x", "y", n, 0, 0) for i, w, n in rows], dtype=dtype)
    sio.savemat(str(folder / "meta.mat"), {"synsets": synsets})
    (folder / GROUND_TRUTH).write_text("".join(f"{t}\n" for t in truth))


def test_class_folder_validation_layout(tmp_path):
    _train(tmp_path)
    _img(tmp_path / "val" / WNIDS[1] / "a.JPEG", 3)
    _img(tmp_path / "val" / WNIDS[2] / "b.JPEG", 4)
    raw = imagenet(str(tmp_path))
    assert raw.class_names == WNIDS and raw.num_classes == 3
    assert len(raw.train) == 6
    assert sorted(raw.train.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert [(Path(p).name, y) for p, y in raw.test.samples] == [("a.JPEG", 1), ("b.JPEG", 2)]
    assert raw.augment.kind == "random_resized_crop_jitter_lighting"


def test_flat_validation_layout_with_devkit_labels(tmp_path):
    _train(tmp_path)
    truth = [2, 1, 3, 1]  # devkit ids of images 1..4
    _flat_val(tmp_path, truth)
    _devkit(tmp_path, truth)
    raw = imagenet(str(tmp_path))
    got = {Path(p).name: y for p, y in raw.test.samples}
    # id 2 -> WNIDS[0] (label 0), id 1 -> WNIDS[2] (label 2), id 3 -> WNIDS[1] (label 1)
    assert got == {
        "ILSVRC2012_val_00000001.JPEG": 0,
        "ILSVRC2012_val_00000002.JPEG": 2,
        "ILSVRC2012_val_00000003.JPEG": 1,
        "ILSVRC2012_val_00000004.JPEG": 2,
    }


def test_flat_validation_layout_with_a_labels_file(tmp_path):
    _train(tmp_path)
    _flat_val(tmp_path, [0, 0])
    labels = tmp_path / "val_labels.txt"
    labels.write_text(
        f"ILSVRC2012_val_00000001.JPEG {WNIDS[1]}\nILSVRC2012_val_00000002 {WNIDS[0]}\n"
    )
    raw = imagenet(str(tmp_path), val_labels=str(labels))
    assert [y for _, y in raw.test.samples] == [1, 0]
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text(
        "ImageId,PredictionString\n"
        f"ILSVRC2012_val_00000001,{WNIDS[2]} 1 2 3 4\nILSVRC2012_val_00000002,{WNIDS[1]} 0 0 1 1\n"
    )
    raw = imagenet(str(tmp_path), val_labels=str(csv))
    assert [y for _, y in raw.test.samples] == [2, 1]


def test_flat_validation_without_labels_is_a_one_line_error(tmp_path, capsys):
    _train(tmp_path)
    _flat_val(tmp_path, [0])
    with pytest.raises(DataError) as err:
        imagenet(str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(
        f"ImageNet {tmp_path.absolute() / 'val'} holds images but no validation labels"
    )
    assert "ILSVRC2012_devkit_t12" in msg and "val/<wnid>/" in msg
    config = tmp_path / "c.yaml"
    config.write_text(
        f"run: {{name: x, device: cpu}}\ndata: {{name: imagenet, root: {tmp_path}}}\n"
        "model: {name: resnet8}\ntrain: {epochs: 1}\nmethod: {name: ce}\n"
    )
    assert main(["train", "-c", str(config), "--set", f"run.out_dir={tmp_path / 'runs'}"]) == 2
    err_out = capsys.readouterr().err.strip().splitlines()
    assert len(err_out) == 1 and err_out[0].startswith("error: ImageNet ")


def test_missing_folder_and_bad_options(tmp_path):
    with pytest.raises(DataError, match=r"ImageNet folder .*train is missing; data.root must hold"):
        imagenet(str(tmp_path))
    with pytest.raises(ConfigError, match=r"needs data.root"):
        imagenet(None)
    with pytest.raises(ConfigError, match="jitter_lighting or random_resized_crop"):
        imagenet(str(tmp_path), augment="autoaugment")


def test_imagenet_cannot_be_downloaded_and_says_where_to_put_it(capsys):
    assert main(["data", "get", "imagenet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: dataset 'imagenet' cannot be downloaded (image-net.org needs")
    assert "train/<wnid>/" in err[0]


def test_lighting_adds_the_pca_offset_computed_here():
    gen = torch.Generator().manual_seed(3)
    alpha = torch.randn(3, generator=torch.Generator().manual_seed(3)) * 0.1
    # V·(α ⊙ λ) by hand, channel by channel
    want = [
        sum(IMAGENET_EIGVEC[c][j] * float(alpha[j]) * IMAGENET_EIGVAL[j] for j in range(3))
        for c in range(3)
    ]
    image = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))
    out = Lighting(0.1, generator=gen)(image)
    diff = out - image
    for c in range(3):
        assert torch.allclose(diff[c], torch.full((4, 5), want[c]), atol=1e-7)
    assert Lighting(0.0)(image) is image
    with pytest.raises(ValueError, match="3×H×W RGB"):
        Lighting()(torch.zeros(1, 4, 4))


def test_lighting_offset_has_the_eigen_structure():
    light = Lighting()
    v = torch.tensor(IMAGENET_EIGVEC)
    for j in range(3):
        alpha = torch.zeros(3)
        alpha[j] = 1.0
        assert torch.allclose(light.offset(alpha), v[:, j] * IMAGENET_EIGVAL[j])
    assert torch.allclose(v.T @ v, torch.eye(3), atol=2e-3)  # orthonormal to 4 digits


def test_build_data_uses_the_paper_augmentation(tmp_path):
    _train(tmp_path)
    _img(tmp_path / "val" / WNIDS[0] / "a.JPEG", 3)
    for w in WNIDS[1:]:
        _img(tmp_path / "val" / w / "b.JPEG", 5)
    bundle = build_data(name="imagenet", root=str(tmp_path), options={"image_size": 8})
    names = [type(t).__name__ for t in bundle.train_loader.dataset.transform.transforms]
    assert names == [
        "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "ToTensor", "Lighting",
        "Normalize",
    ]  # fmt: skip
    test_names = [type(t).__name__ for t in bundle.test_loader.dataset.transform.transforms]
    assert test_names == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert bundle.resolved["augment"]["kind"] == "random_resized_crop_jitter_lighting"
    x, _y, _ = next(iter(bundle.train_loader.iterate(0)))
    assert x.shape[1:] == (3, 8, 8)
    with pytest.raises(ConfigError, match="crop_padding does not apply"):
        build_data(name="imagenet", root=str(tmp_path), augment={"crop_padding": 4})
