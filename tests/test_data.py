"""Tests of selfkd.data: on-disk formats, splits, loaders and the batch transform."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_writers import cifar_images, pickle_file
from selfkd.data import (
    DATASETS,
    ArrayImageDataset,
    BatchTransform,
    EpochLoader,
    FileImageDataset,
    build_data,
    per_class_subset,
    train_val_split,
)
from selfkd.data.idx import read_idx
from selfkd.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------
# writers for the official on-disk formats
# --------------------------------------------------------------------------------------------
@pytest.fixture
def cifar100_root(tmp_path: Path) -> Path:
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    fine = [f"fine{i}".encode() for i in range(100)]
    coarse = [f"coarse{i}".encode() for i in range(20)]
    pickle_file(d / "meta", {b"fine_label_names": fine, b"coarse_label_names": coarse})
    for split, per_class, offset in (("train", 3, 0), ("test", 1, 1000)):
        n = 100 * per_class
        fine_labels = [i % 100 for i in range(n)]
        pickle_file(
            d / split,
            {
                b"data": cifar_images(n, offset),
                b"fine_labels": fine_labels,
                b"coarse_labels": [y // 5 for y in fine_labels],
                b"filenames": [b"x.png"] * n,
            },
        )
    return tmp_path


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    names = [
        n.encode()
        for n in ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    ]
    pickle_file(d / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 4})
    for i in range(1, 6):
        offset = 4 * (i - 1)
        pickle_file(
            d / f"data_batch_{i}",
            {b"data": cifar_images(4, offset), b"labels": [(offset + j) % 10 for j in range(4)]},
        )
    pickle_file(d / "test_batch", {b"data": cifar_images(6, 100), b"labels": list(range(6))})
    return tmp_path


def _write_idx(path: Path, array: np.ndarray, magic: int, gz: bool) -> Path:
    payload = struct.pack(">i", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    payload += array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def _idx_dir(d: Path, gz: bool, n_train: int = 30, n_test: int = 10, size: int = 8) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        _write_idx(d / f"{split}-images-idx3-ubyte", images, 2051, gz)
        _write_idx(d / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, 2049, gz)
    return d


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    root = tmp_path / "folders"
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("bird", "ant"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------
def test_cifar100_fine_and_coarse(cifar100_root: Path) -> None:
    raw = DATASETS.get("cifar100")(str(cifar100_root))
    assert len(raw.train) == 300 and len(raw.test) == 100
    assert raw.train.images.shape == (300, 3, 32, 32) and raw.train.images.dtype == torch.uint8
    assert raw.num_classes == 100 and raw.class_names[7] == "fine7"
    assert raw.train.labels.dtype == torch.int64
    assert raw.train.labels[:5].tolist() == [0, 1, 2, 3, 4]
    assert raw.train.images[5, 0, 0, 0] == 5  # channel-major reshape, order kept
    assert raw.mean == (0.5071, 0.4865, 0.4409) and raw.std == (0.2673, 0.2564, 0.2762)
    assert raw.augment.crop_padding == 4 and raw.augment.hflip
    coarse = DATASETS.get("cifar-100")(str(cifar100_root), labels="coarse")
    assert coarse.num_classes == 20 and coarse.class_names[0] == "coarse0"
    assert coarse.train.labels[:10].tolist() == [y // 5 for y in range(10)]


def test_cifar_root_may_be_the_dataset_folder(cifar100_root: Path) -> None:
    raw = DATASETS.get("cifar100")(str(cifar100_root / "cifar-100-python"))
    assert len(raw.train) == 300


def test_cifar10_concatenates_batches(cifar10_root: Path) -> None:
    raw = DATASETS.get("cifar10")(str(cifar10_root))
    assert len(raw.train) == 20 and len(raw.test) == 6
    assert raw.train.images[:, 0, 0, 0].tolist() == list(range(20))
    assert raw.train.labels.tolist() == [i % 10 for i in range(20)]
    assert raw.class_names[:2] == ["plane", "car"]
    assert raw.std == (0.2470, 0.2435, 0.2616)


def test_cifar_errors_name_the_problem(cifar100_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cifar-100-python/train is missing.*data\.root"):
        DATASETS.get("cifar100")(str(tmp_path / "nowhere"))
    d = cifar100_root / "cifar-100-python"
    (d / "test").unlink()
    with pytest.raises(DataError, match=r"cifar-100-python/test is missing"):
        DATASETS.get("cifar100")(str(cifar100_root))
    pickle_file(d / "test", {b"fine_labels": [0], b"coarse_labels": [0]})
    with pytest.raises(DataError, match=r"cifar-100-python/test has no b'data'"):
        DATASETS.get("cifar100")(str(cifar100_root))
    (d / "test").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match=r"cannot read CIFAR file .*cifar-100-python/test"):
        DATASETS.get("cifar100")(str(cifar100_root))
    with pytest.raises(ConfigError, match=r"accepted data.options: labels"):
        DATASETS.get("cifar100")(str(cifar100_root), lables="fine")
    with pytest.raises(ConfigError, match=r"'fine' or 'coarse'"):
        DATASETS.get("cifar100")(str(cifar100_root), labels="medium")


# --------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_idx_gz_and_raw(tmp_path: Path, gz: bool) -> None:
    root = _idx_dir(tmp_path / "fm", gz)
    raw = DATASETS.get("fashion-mnist")(str(root))
    assert raw.train.images.shape == (30, 1, 8, 8) and raw.test.images.shape == (10, 1, 8, 8)
    assert raw.train.images[:, 0, 0, 0].tolist() == list(range(30))
    assert raw.train.labels.tolist() == [i % 10 for i in range(30)]
    assert raw.in_channels == 1 and raw.image_size == 8 and raw.num_classes == 10
    assert raw.class_names[0] == "T-shirt/top" and raw.class_names[9] == "Ankle boot"


def test_idx_found_in_subfolder_and_env(tmp_path: Path, monkeypatch) -> None:
    _idx_dir(tmp_path / "fashion-mnist", gz=True)
    assert len(DATASETS.get("fashion-mnist")(str(tmp_path)).train) == 30
    monkeypatch.setenv("SELFKD_FASHION_MNIST", str(tmp_path / "fashion-mnist"))
    assert len(DATASETS.get("fashion-mnist")(None).test) == 10
    _idx_dir(tmp_path / "MNIST" / "raw", gz=False)
    assert len(DATASETS.get("mnist")(str(tmp_path)).train) == 30


def test_idx_errors_name_the_file(tmp_path: Path) -> None:
    root = _idx_dir(tmp_path / "fm", gz=False)
    labels = root / "t10k-labels-idx1-ubyte"
    data = labels.read_bytes()

    labels.unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\(\.gz\) is missing"):
        DATASETS.get("fashion-mnist")(str(root))

    labels.write_bytes(struct.pack(">i", 2051) + data[4:])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte has magic number 2051"):
        DATASETS.get("fashion-mnist")(str(root))

    labels.write_bytes(data[:-3])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte is truncated"):
        DATASETS.get("fashion-mnist")(str(root))

    labels.write_bytes(data[:6])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte is truncated"):
        DATASETS.get("fashion-mnist")(str(root))

    _write_idx(labels, np.arange(9) % 10, 2049, gz=False)  # 9 labels for 10 images
    with pytest.raises(DataError, match=r"10 images but .*t10k-labels-idx1-ubyte holds 9"):
        DATASETS.get("fashion-mnist")(str(root))


def test_idx_truncated_gzip(tmp_path: Path) -> None:
    root = _idx_dir(tmp_path / "fm", gz=True)
    images = root / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:40])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz"):
        DATASETS.get("fashion-mnist")(str(root))
    with pytest.raises(DataError, match=r"IDX file .* is missing"):
        read_idx(root / "absent", 2051)


@pytest.mark.skipif(
    not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist() -> None:
    raw = DATASETS.get("fashion-mnist")(str(DEBIAN_FMNIST))
    assert raw.train.images.shape == (60000, 1, 28, 28)
    assert raw.test.images.shape == (10000, 1, 28, 28)
    assert raw.num_classes == 10
    assert torch.bincount(raw.train.labels).tolist() == [6000] * 10
    assert torch.bincount(raw.test.labels).tolist() == [1000] * 10
    mean = raw.train.images.float().mean().item() / 255
    assert abs(mean - raw.mean[0]) < 1e-3


# --------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------
def test_imagefolder(folder_root: Path) -> None:
    raw = DATASETS.get("imagefolder")(str(folder_root), image_size=16)
    assert isinstance(raw.train, FileImageDataset)
    assert raw.class_names == ["ant", "bird"] and raw.num_classes == 2
    assert len(raw.train) == 6 and len(raw.test) == 4
    assert raw.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert raw.augment.kind == "random_resized_crop"

    bundle = build_data(
        name="imagefolder", root=str(folder_root), batch_size=4, options={"image_size": 16}
    )
    assert bundle.transform.passthrough
    seen = []
    for x, y, idx in bundle.train_loader.iterate(0):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16)
        assert y.tolist() == bundle.train_labels[idx].tolist()
        seen += idx.tolist()
    assert sorted(seen) == list(range(6))
    x, _, _ = next(iter(bundle.test_loader))
    assert x.shape == (4, 3, 16, 16)
    assert bundle.transform.train(x) is x

    cifar = build_data(
        name="imagefolder",
        root=str(folder_root),
        batch_size=4,
        augment={"crop_padding": 2},
        options={"image_size": 8, "protocol": "cifar"},
    )
    assert cifar.resolved["augment"]["crop_padding"] == 2
    assert next(cifar.train_loader.iterate(0))[0].shape == (4, 3, 8, 8)
    with pytest.raises(ConfigError, match="random-resized-crop"):
        build_data(name="imagefolder", root=str(folder_root), augment={"crop_padding": 4})


def test_imagefolder_persistent_workers_follow_each_epoch(folder_root: Path) -> None:
    b = build_data(
        name="imagefolder", root=str(folder_root), batch_size=4, workers=1,
        options={"image_size": 8},
    )  # fmt: skip
    loader = b.train_loader
    for epoch in (0, 1, 1):
        got = [idx.tolist() for _, _, idx in loader.iterate(epoch, start_batch=epoch)]
        assert got == [t.tolist() for t in loader.batches(epoch)[epoch:]]


def test_imagefolder_errors(folder_root: Path) -> None:
    (folder_root / "val" / "cow").mkdir()
    with pytest.raises(DataError, match=r"val/cow is a class that .*train lacks"):
        DATASETS.get("imagefolder")(str(folder_root))
    with pytest.raises(DataError, match=r"image folder .*nowhere/train is missing"):
        DATASETS.get("imagefolder")(str(folder_root / "nowhere"))
    with pytest.raises(ConfigError, match=r"accepted data.options: image_size, protocol"):
        DATASETS.get("imagefolder")(str(folder_root), size=3)


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------
def test_per_class_subset() -> None:
    labels = torch.arange(200) % 4
    a = per_class_subset(labels, 10, seed=1)
    assert torch.equal(a, per_class_subset(labels, 10, seed=1))
    assert not torch.equal(a, per_class_subset(labels, 10, seed=2))
    assert torch.equal(a, torch.sort(a).values)
    assert torch.bincount(labels[a]).tolist() == [10] * 4
    with pytest.raises(DataError, match=r"class 3 has only 2 training samples"):
        per_class_subset(torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]), 3, seed=0)
    with pytest.raises(DataError, match=r"class 2 has only 0"):
        per_class_subset(torch.tensor([0, 1]), 1, seed=0, num_classes=3)


def test_train_val_split() -> None:
    labels = torch.arange(100) % 5
    tr, va = train_val_split(labels, 20, seed=0)
    assert len(va) == 20 and len(tr) == 80
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(100))
    assert torch.bincount(labels[va]).tolist() == [4] * 5  # stratified
    tr2, va2 = train_val_split(labels, 20, seed=0)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    assert not torch.equal(va, train_val_split(labels, 20, seed=1)[1])
    assert len(train_val_split(labels, 0.1, seed=0)[1]) == 10
    assert torch.equal(train_val_split(labels, 20.0, seed=0)[1], va)  # integral float = count
    assert len(train_val_split(labels, 7, seed=0, stratified=False)[1]) == 7
    assert len(train_val_split(labels, 7, seed=0)[1]) == 7  # largest remainder keeps the total
    with pytest.raises(ConfigError, match="val_size"):
        train_val_split(labels, 1.5, seed=0)
    with pytest.raises(ConfigError, match="val_size"):
        train_val_split(labels, 100, seed=0)


def test_build_data_subsets_and_indices() -> None:
    kw = dict(name="synthetic", per_class=20, val_size=50, split_seed=3, batch_size=32)
    b = build_data(**kw, options={"train_per_class": 40})
    assert b.num_train == 200 and len(b.train_labels) == 200
    assert torch.bincount(b.train_labels).tolist() == [20] * 10
    assert b.val_loader is not None and b.resolved["sizes"]["val"] == 50
    assert set(b.train_source_indices.tolist()).isdisjoint(b.val_source_indices.tolist())
    seen = torch.cat([idx for _, _, idx in b.train_loader.iterate(0)])
    assert sorted(seen.tolist()) == list(range(200))
    for _, y, idx in b.train_loader.iterate(1):
        assert torch.equal(y, b.train_labels[idx])
    again = build_data(**kw, options={"train_per_class": 40})
    assert torch.equal(again.train_source_indices, b.train_source_indices)
    x1 = next(b.train_loader.iterate(0))[0]
    assert torch.equal(x1, next(again.train_loader.iterate(0))[0])
    other = build_data(**{**kw, "split_seed": 4}, options={"train_per_class": 40})
    assert not torch.equal(other.train_source_indices, b.train_source_indices)
    assert b.test_loader.batches(0)[0].tolist() == list(range(b.resolved["sizes"]["test"]))


def test_build_data_overrides_and_errors() -> None:
    b = build_data(
        name="synthetic",
        normalize={"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]},
        augment={"crop_padding": 2, "hflip": False},
    )
    assert b.resolved["normalize"] == {
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.2023, 0.1994, 0.2010],
    }
    assert b.transform.std == (0.2023, 0.1994, 0.2010)
    assert b.transform.crop_padding == 2 and not b.transform.hflip
    assert b.resolved["augment"]["crop_padding"] == 2
    with pytest.raises(ConfigError, match=r"unknown dataset 'cifar1000'.*did you mean"):
        build_data(name="cifar1000")
    with pytest.raises(ConfigError, match=r"unknown key 'pad' in data.augment"):
        build_data(name="synthetic", augment={"pad": 4})
    with pytest.raises(ConfigError, match=r"3 values but the images have 1 channels"):
        build_data(name="synthetic", options={"channels": 1}, normalize={"mean": [0.5] * 3})
    with pytest.raises(ConfigError, match=r"accepted data.options: channels"):
        build_data(name="synthetic", options={"classes": 3})


def test_synthetic_is_deterministic() -> None:
    a = DATASETS.get("synthetic")(None, seed=5, num_classes=3, train_per_class=4)
    b = DATASETS.get("synthetic")(None, seed=5, num_classes=3, train_per_class=4)
    c = DATASETS.get("synthetic")(None, seed=6, num_classes=3, train_per_class=4)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)
    assert a.train.images.shape == (12, 3, 32, 32) and len(a.test) == 60
    assert torch.bincount(a.train.labels).tolist() == [4, 4, 4]


# --------------------------------------------------------------------------------------------
# EpochLoader
# --------------------------------------------------------------------------------------------
def _array_dataset(n: int) -> ArrayImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return ArrayImageDataset(images, torch.arange(n) % 3, ["a", "b", "c"])


def test_epoch_loader_order_and_resume() -> None:
    ds = _array_dataset(50)
    loader = EpochLoader(ds, 8, shuffle=True, drop_last=False, seed=7)
    assert len(loader) == 7
    e0 = loader.batches(0)
    assert [b.tolist() for b in e0] == [b.tolist() for b in loader.batches(0)]
    assert torch.cat(e0).tolist() != torch.cat(loader.batches(1)).tolist()
    assert sorted(torch.cat(e0).tolist()) == list(range(50))
    other_seed = EpochLoader(ds, 8, shuffle=True, drop_last=False, seed=8)
    assert torch.cat(other_seed.batches(0)).tolist() != torch.cat(e0).tolist()
    full = list(loader.iterate(3))
    resumed = list(loader.iterate(3, start_batch=4))
    assert len(full) == 7 and len(resumed) == 3
    for (x, y, i), (x2, y2, i2) in zip(full[4:], resumed, strict=True):
        assert torch.equal(i, i2) and torch.equal(x, x2) and torch.equal(y, y2)
    x, y, i = full[0]
    assert x.dtype == torch.uint8 and i.dtype == torch.int64
    assert x[:, 0, 0, 0].long().tolist() == i.tolist() and y.tolist() == (i % 3).tolist()
    assert list(loader.iterate(3, start_batch=7)) == []
    with pytest.raises(ConfigError, match="start_batch"):
        loader.iterate(3, start_batch=8)
    dropping = EpochLoader(ds, 8, shuffle=True, drop_last=True, seed=7)
    assert len(dropping) == 6 and all(len(b) == 8 for b in dropping.batches(2))
    plain = EpochLoader(ds, 20, shuffle=False, drop_last=False, seed=0)
    assert torch.cat(plain.batches(5)).tolist() == list(range(50))


def test_epoch_loader_world_size_two() -> None:
    ds = _array_dataset(51)
    shards = [
        EpochLoader(ds, 8, shuffle=True, drop_last=False, seed=1, rank=r, world_size=2)
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 4  # 26 samples per rank
    parts = [torch.cat(s.batches(2)) for s in shards]
    assert len(parts[0]) == len(parts[1]) == 26
    assert set(parts[0].tolist()) | set(parts[1].tolist()) == set(range(51))
    assert len(set(parts[0].tolist()) & set(parts[1].tolist())) <= 1  # one padded repeat
    with pytest.raises(ConfigError, match="rank"):
        EpochLoader(ds, 8, shuffle=True, drop_last=False, seed=1, rank=2, world_size=2)


def test_epoch_loader_custom_batch_sampler() -> None:
    ds = _array_dataset(12)

    def pairs(epoch: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(epoch)
        anchors = torch.randperm(12, generator=g)[:6]
        return [torch.cat([anchors[k : k + 2], anchors[k : k + 2]]) for k in range(0, 6, 2)]

    loader = EpochLoader(ds, 2, shuffle=True, drop_last=False, seed=0, batch_sampler=pairs)
    assert len(loader) == 3
    assert [b.tolist() for b in loader.batches(4)] == [b.tolist() for b in pairs(4)]
    _, _, idx = next(loader.iterate(4))
    assert idx.tolist() == pairs(4)[0].tolist()
    ranks = [
        EpochLoader(
            ds, 2, shuffle=True, drop_last=False, seed=0, batch_sampler=pairs, rank=r, world_size=2
        )
        for r in range(2)
    ]
    assert [len(r.batches(0)) for r in ranks] == [2, 2]


# --------------------------------------------------------------------------------------------
# BatchTransform
# --------------------------------------------------------------------------------------------
def test_batch_transform_normalizes() -> None:
    t = BatchTransform((0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    x = torch.full((4, 3, 5, 5), 255, dtype=torch.uint8)
    y = t.eval(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y[:, 0], torch.ones(1)) and torch.allclose(y[:, 1], torch.full((1,), 3.0))
    assert torch.allclose(y[:, 2], torch.ones(1))
    assert torch.allclose(t.eval(x.float() / 255), y)
    assert torch.equal(
        BatchTransform((0.5,), (0.5,)).train(x), BatchTransform((0.5,), (0.5,)).eval(x)
    )
    with pytest.raises(ConfigError, match="normalization has 3 channels"):
        t.eval(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))


def test_crop_is_a_window_of_the_zero_padded_image() -> None:
    p, h, w = 3, 6, 7
    x = torch.randint(1, 256, (64, 2, h, w), dtype=torch.uint8)  # no zero pixels in the image
    t = BatchTransform((0.0, 0.0), (1.0, 1.0), crop_padding=p, hflip=False)
    out = t.crop_flip(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    offsets = set()
    for b in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[b], padded[b, :, dy : dy + h, dx : dx + w])
        ]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 10  # per-sample offsets, not one per batch
    ref = t.crop_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, ref)  # the generator makes it reproducible
    torch.manual_seed(3)
    a = t.train(x)
    torch.manual_seed(3)
    assert torch.equal(a, t.train(x))  # and so does the global RNG
    torch.manual_seed(3)
    assert torch.allclose(a, t.eval(t.crop_flip(x)))  # train = normalize(crop_flip(x))


def test_flip_really_flips_and_identity_without_augmentation() -> None:
    x = torch.randint(0, 256, (64, 3, 4, 5), dtype=torch.uint8)
    t = BatchTransform((0.5,) * 3, (0.2,) * 3, crop_padding=0, hflip=True)
    out = t.crop_flip(x, torch.Generator().manual_seed(1))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)]
    same = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 10 < sum(flipped) < 54
    none = BatchTransform((0.5,) * 3, (0.2,) * 3, crop_padding=0, hflip=False)
    assert torch.equal(none.train(x), none.eval(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_batch_transform_on_cuda() -> None:
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    t = BatchTransform((0.5,) * 3, (0.2,) * 3, crop_padding=2, hflip=True)
    y = t.train(x.cuda())
    assert y.device.type == "cuda" and y.shape == x.shape
    torch.testing.assert_close(t.eval(x.cuda()).cpu(), t.eval(x))


# --------------------------------------------------------------------------------------------
# bench helpers
# --------------------------------------------------------------------------------------------
def test_bench_update_section(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "bench" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    doc = tmp_path / "b.md"
    common.update_section(doc, "augment", "one")
    common.update_section(doc, "other", "two")
    common.update_section(doc, "augment", "three\nlines")
    text = doc.read_text()
    assert "one" not in text and "three\nlines" in text and "two" in text
    assert text.index("bench:augment") < text.index("bench:other")
