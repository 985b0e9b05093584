"""Readers of the official dataset layouts: Tiny-ImageNet, CUB-200-2011, Stanford Dogs, MIT67,
FGVC-Aircraft and Caltech-101, each on a tiny generated tree (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfkd.data import DATASETS, build_data
from selfkd.data.tinyimagenet import TINY_MEAN
from selfkd.errors import ConfigError, DataError


def _img(path: Path, shade: int, size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade, 255 - shade, (3 * shade) % 256)).save(path)


def _write(path: Path, lines: list[str], newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + newline for line in lines).encode())


def _labels(split) -> list[tuple[str, int]]:
    return [(Path(p).name, y) for p, y in split.samples]


# --------------------------------------------------------------------------------------------
# tiny trees in the official layouts
# --------------------------------------------------------------------------------------------
TINY_WNIDS = ["n02124075", "n01443537", "n09256479"]  # wnids.txt order (not sorted)


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    d = tmp_path / "tiny-imagenet-200"
    _write(d / "wnids.txt", TINY_WNIDS)
    _write(
        d / "words.txt",
        ["n01443537\tgoldfish, Carassius auratus", "n02124075\tEgyptian cat", "n00001\tentity"],
    )
    for k, w in enumerate(TINY_WNIDS):
        for i in range(2):
            _img(d / "train" / w / "images" / f"{w}_{i}.JPEG", 10 * k + i, (64, 64))
        _write(d / "train" / w / f"{w}_boxes.txt", [f"{w}_0.JPEG\t0\t0\t10\t10"])
    ann = []
    for i, w in enumerate(["n09256479", "n01443537", "n02124075", "n01443537"]):
        _img(d / "val" / "images" / f"val_{i}.JPEG", 100 + i, (64, 64))
        ann.append(f"val_{i}.JPEG\t{w}\t1\t2\t30\t40")
    _write(d / "val" / "val_annotations.txt", ann)
    _img(d / "test" / "images" / "test_0.JPEG", 7, (64, 64))
    return tmp_path


@pytest.fixture
def cub_root(tmp_path: Path) -> Path:
    d = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    _write(d / "classes.txt", [f"{i + 1} {c}" for i, c in enumerate(classes)])
    images, split, labels = [], [], []
    for n in range(1, 7):
        c = (n - 1) // 2
        rel = f"{classes[c]}/{classes[c][4:]}_{n:04d}_{n}.jpg"
        _img(d / "images" / rel, 30 * n)
        images.append(f"{n} {rel}")
        split.append(f"{n} {1 if n % 2 else 0}")
        labels.append(f"{n} {c + 1}")
    _write(d / "images.txt", images)
    _write(d / "train_test_split.txt", split)
    _write(d / "image_class_labels.txt", labels)
    _write(tmp_path / "attributes.txt", ["1 has_bill_shape::curved"])
    return tmp_path


def _cell(strings: list[str]) -> np.ndarray:
    cell = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cell[i, 0] = s
    return cell


DOG_BREEDS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]


@pytest.fixture
def dogs_root(tmp_path: Path) -> Path:
    from scipy.io import savemat

    d = tmp_path / "StanfordDogs"
    lists: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for k, breed in enumerate(DOG_BREEDS):
        wnid = breed.split("-")[0]
        for i in range(3):
            rel = f"{breed}/{wnid}_{100 + i}.jpg"
            _img(d / "Images" / rel, 40 * k + i)
            split = "train" if i < 2 else "test"
            lists[split][0].append(rel)
            lists[split][1].append(k + 1)
    for split, (files, labels) in lists.items():
        savemat(
            str(d / f"{split}_list.mat"),
            {
                "file_list": _cell(files),
                "annotation_list": _cell([f.removesuffix(".jpg") for f in files]),
                "labels": np.asarray(labels, dtype=np.float64).reshape(-1, 1),
            },
        )
    return tmp_path


MIT_CLASSES = ["bakery", "airport_inside", "bar"]


@pytest.fixture
def mit67_root(tmp_path: Path) -> Path:
    d = tmp_path / "indoorCVPR_09"
    train, test = [], []
    for k, c in enumerate(MIT_CLASSES):
        for i in range(4):
            rel = f"{c}/{c}_{i:04d}.jpg"
            _img(d / "Images" / rel, 50 * k + i)
            if i < 2:
                train.append(rel)
            elif i == 2:
                test.append(rel)
            # i == 3: an image in no list (MIT67 has many), ignored
    _write(d / "TrainImages.txt", train, newline="\r\n")
    _write(d / "TestImages.txt", test, newline="\r\n")
    return tmp_path


AIR_VARIANTS = ["707-320", "Cessna 172", "F/A-18"]
AIR_FAMILIES = ["Boeing 707", "Cessna 172", "F/A-18"]


@pytest.fixture
def aircraft_root(tmp_path: Path) -> Path:
    d = tmp_path / "fgvc-aircraft-2013b" / "data"
    rows: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    n = 1000000
    for k in range(3):
        for split in ("train", "val", "test"):
            image_id = f"{n:07d}"
            n += 1
            _img(d / "images" / f"{image_id}.jpg", 60 * k + len(rows[split]), (16, 14))
            rows[split].append((image_id, k))
    rows["trainval"] = rows["train"] + rows["val"]
    for split, entries in rows.items():
        _write(d / f"images_variant_{split}.txt", [f"{i} {AIR_VARIANTS[k]}" for i, k in entries])
        _write(d / f"images_family_{split}.txt", [f"{i} {AIR_FAMILIES[k]}" for i, k in entries])
    _write(d / "variants.txt", AIR_VARIANTS)  # official order, not sorted by the reader
    return tmp_path


@pytest.fixture
def caltech_root(tmp_path: Path) -> Path:
    d = tmp_path / "101_ObjectCategories"
    for k, c in enumerate(["airplanes", "accordion", "BACKGROUND_Google"]):
        for i in range(5):
            _img(d / c / f"image_{i + 1:04d}.jpg", 40 * k + i)
    return tmp_path


# --------------------------------------------------------------------------------------------
# every reader: counts, labels, names, loaders
# --------------------------------------------------------------------------------------------
READERS = [
    ("tiny-imagenet", "tiny_root", {}, 6, 4, 3),
    ("cub200", "cub_root", {}, 3, 3, 3),
    ("stanford-dogs", "dogs_root", {}, 6, 3, 3),
    ("mit67", "mit67_root", {}, 6, 3, 3),
    ("fgvc-aircraft", "aircraft_root", {}, 6, 3, 3),
    ("caltech101", "caltech_root", {"train_per_class": 2}, 4, 6, 2),
]


@pytest.mark.parametrize(("name", "fixture", "opts", "n_train", "n_test", "k"), READERS)
def test_reader_builds_batches(
    request: pytest.FixtureRequest,
    name: str,
    fixture: str,
    opts: dict,
    n_train: int,
    n_test: int,
    k: int,
) -> None:
    root = request.getfixturevalue(fixture)
    raw = DATASETS.get(name)(str(root), **opts)
    assert (len(raw.train), len(raw.test), raw.num_classes) == (n_train, n_test, k)
    assert raw.in_channels == 3 and len(raw.class_names) == k
    for split in (raw.train, raw.test):
        assert all(Path(p).is_file() for p, _ in split.samples)
        assert int(split.labels.min()) >= 0 and int(split.labels.max()) < k
    assert set(raw.train.labels.tolist()) == set(range(k))
    bundle = build_data(name=name, root=str(root), batch_size=2, options={**opts, "image_size": 32})
    assert bundle.num_classes == k and bundle.image_size == 32
    assert bundle.resolved["sizes"]["train"] == n_train
    x, y, idx = next(iter(bundle.train_loader.iterate(0)))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 32, 32)
    assert y.dtype == torch.long and idx.dtype == torch.long and y.shape == idx.shape == (2,)
    assert torch.equal(y, bundle.train_labels[idx])
    xt, yt, _ = next(iter(bundle.test_loader))
    assert xt.shape[1:] == (3, 32, 32) and torch.isfinite(xt).all()
    assert yt.shape[0] == min(n_test, 512)


def test_readers_are_listed() -> None:
    docs = dict(DATASETS.describe())
    for name, *_ in READERS:
        assert docs[name]


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet
# --------------------------------------------------------------------------------------------
def test_tiny_imagenet_labels_names_and_protocol(tiny_root: Path) -> None:
    raw = DATASETS.get("tiny-imagenet")(str(tiny_root / "tiny-imagenet-200"))  # folder itself
    # labels follow the sorted wnids; names come from words.txt (first synonym) or the wnid
    assert raw.class_names == ["goldfish", "Egyptian cat", "n09256479"]
    assert _labels(raw.train)[:2] == [("n01443537_0.JPEG", 0), ("n01443537_1.JPEG", 0)]
    assert sorted(_labels(raw.test)) == [
        ("val_0.JPEG", 2), ("val_1.JPEG", 0), ("val_2.JPEG", 1), ("val_3.JPEG", 0),
    ]  # fmt: skip
    assert raw.image_size == 64 and raw.mean == TINY_MEAN
    assert raw.augment.kind == "pad_crop" and raw.augment.crop_padding == 4
    assert raw.augment.crop_size == 64 and raw.augment.hflip
    assert DATASETS.canonical("tinyimagenet") == "tiny-imagenet"


def test_tiny_imagenet_errors(tiny_root: Path) -> None:
    d = tiny_root / "tiny-imagenet-200"
    get = DATASETS.get("tiny-imagenet")
    with pytest.raises(ConfigError, match="image_size"):
        get(str(tiny_root), image_size=0)
    with pytest.raises(ConfigError, match="unknown option 'size'"):
        get(str(tiny_root), size=64)
    with pytest.raises(DataError, match=r"Tiny-ImageNet not found.*tiny-imagenet-200/"):
        get(str(tiny_root / "elsewhere"))
    ann = d / "val" / "val_annotations.txt"
    text = ann.read_text()
    # an annotation naming a missing image
    ann.write_text(text + "val_9.JPEG\tn01443537\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"refers to image .*val_9\.JPEG.*does not exist"):
        get(str(tiny_root))
    # a validation image without an annotation
    ann.write_text(text)
    _img(d / "val" / "images" / "val_5.JPEG", 3)
    with pytest.raises(DataError, match=r"val_5\.JPEG has no entry in .*val_annotations\.txt"):
        get(str(tiny_root))
    # an unknown wnid
    ann.write_text(text + "val_5.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="n99999999"):
        get(str(tiny_root))
    ann.unlink()
    with pytest.raises(DataError, match=r"val_annotations\.txt is missing; it should contain"):
        get(str(tiny_root))


def test_tiny_imagenet_missing_class_folder(tiny_root: Path) -> None:
    d = tiny_root / "tiny-imagenet-200"
    for p in (d / "train" / "n09256479" / "images").iterdir():
        p.unlink()
    (d / "train" / "n09256479" / "images").rmdir()
    with pytest.raises(DataError, match=r"n09256479/images is missing"):
        DATASETS.get("tiny-imagenet")(str(tiny_root))


# --------------------------------------------------------------------------------------------
# CUB-200-2011
# --------------------------------------------------------------------------------------------
def test_cub200(cub_root: Path) -> None:
    raw = DATASETS.get("cub200")(str(cub_root))
    assert raw.class_names == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert [y for _, y in raw.train.samples] == [0, 1, 2]  # ids 1, 3, 5 (is_train 1)
    assert [y for _, y in raw.test.samples] == [0, 1, 2]  # ids 2, 4, 6
    assert Path(raw.train.samples[0][0]).name == "Black_footed_Albatross_0001_1.jpg"
    assert raw.augment.kind == "random_resized_crop" and raw.augment.crop_size == 224
    assert raw.mean == (0.485, 0.456, 0.406) and raw.image_size == 224
    assert raw.root == str(cub_root / "CUB_200_2011")
    assert len(DATASETS.get("cub200")(str(cub_root / "CUB_200_2011")).train) == 3


def test_cub200_default_root(cub_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFKD_DATA", str(cub_root))
    assert len(DATASETS.get("cub200")(None).train) == 3
    nested = cub_root / "nested"
    (nested / "cub200").mkdir(parents=True)
    (cub_root / "CUB_200_2011").rename(nested / "cub200" / "CUB_200_2011")
    monkeypatch.setenv("SELFKD_DATA", str(nested))
    assert len(DATASETS.get("cub200")(None).test) == 3
    monkeypatch.setenv("SELFKD_DATA", str(cub_root / "empty"))
    monkeypatch.chdir(cub_root)
    with pytest.raises(DataError, match=r"CUB-200-2011 not found.*data\.root unset"):
        DATASETS.get("cub200")(None)


def test_cub200_errors(cub_root: Path) -> None:
    d = cub_root / "CUB_200_2011"
    get = DATASETS.get("cub200")
    split = d / "train_test_split.txt"
    text = split.read_text()
    split.write_text("\n".join(text.splitlines()[:-1]) + "\n")  # id 6 loses its entry
    with pytest.raises(DataError, match=r"image id 6 \(.*\) has no entry in .*train_test_split"):
        get(str(cub_root))
    split.write_text(text + "7 1\n")
    with pytest.raises(DataError, match=r"lists image id 7, which images\.txt lacks"):
        get(str(cub_root))
    split.unlink()
    with pytest.raises(
        DataError,
        match=r"CUB-200-2011: .*CUB_200_2011/train_test_split\.txt is missing; it should contain"
        r".*set data.root to the folder that contains CUB_200_2011/",
    ):
        get(str(cub_root))
    split.write_text(text)
    images = d / "images.txt"
    images.write_text(images.read_text().replace("_0004_4.jpg", "_0004_4.png"))
    with pytest.raises(DataError, match=r"images\.txt refers to image .*_0004_4\.png"):
        get(str(cub_root))


# --------------------------------------------------------------------------------------------
# Stanford Dogs
# --------------------------------------------------------------------------------------------
def test_stanford_dogs(dogs_root: Path) -> None:
    raw = DATASETS.get("stanford-dogs")(str(dogs_root))
    assert raw.class_names == ["Chihuahua", "Japanese_spaniel", "Maltese_dog"]
    assert [y for _, y in raw.train.samples] == [0, 0, 1, 1, 2, 2]
    assert _labels(raw.test) == [
        ("n02085620_102.jpg", 0), ("n02085782_102.jpg", 1), ("n02085936_102.jpg", 2),
    ]  # fmt: skip
    assert raw.root == str(dogs_root / "StanfordDogs")


def test_stanford_dogs_errors(dogs_root: Path) -> None:
    from scipy.io import savemat

    d = dogs_root / "StanfordDogs"
    get = DATASETS.get("stanford-dogs")
    (d / "Images" / DOG_BREEDS[1] / "n02085782_101.jpg").unlink()
    with pytest.raises(DataError, match=r"train_list\.mat refers to image .*n02085782_101\.jpg"):
        get(str(dogs_root))
    savemat(str(d / "test_list.mat"), {"file_list": _cell(["a/b.jpg"])})
    with pytest.raises(DataError, match=r"test_list\.mat has no 'labels' variable"):
        get(str(d))
    (d / "test_list.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match=r"cannot read .*test_list\.mat"):
        get(str(d))
    (d / "test_list.mat").unlink()
    with pytest.raises(DataError, match=r"test_list\.mat is missing; it should be"):
        get(str(d))


# --------------------------------------------------------------------------------------------
# MIT67
# --------------------------------------------------------------------------------------------
def test_mit67(mit67_root: Path) -> None:
    raw = DATASETS.get("mit67")(str(mit67_root))
    assert raw.class_names == sorted(MIT_CLASSES)
    assert _labels(raw.test) == [
        ("bakery_0002.jpg", 1), ("airport_inside_0002.jpg", 0), ("bar_0002.jpg", 2),
    ]  # fmt: skip
    assert len(raw.train) == 6 and all(not p.endswith("_0003.jpg") for p, _ in raw.train.samples)


def test_mit67_errors(mit67_root: Path) -> None:
    d = mit67_root / "indoorCVPR_09"
    get = DATASETS.get("mit67")
    test_list = d / "TestImages.txt"
    text = test_list.read_text()
    test_list.write_text(text + "kitchen/k_1.jpg\n")
    with pytest.raises(DataError, match=r"class 'kitchen', which TrainImages\.txt lacks"):
        get(str(mit67_root))
    test_list.write_text(text + "bar/missing.jpg\n")
    with pytest.raises(DataError, match=r"TestImages\.txt refers to image .*bar/missing\.jpg"):
        get(str(mit67_root))
    test_list.unlink()
    with pytest.raises(DataError, match=r"TestImages\.txt is missing"):
        get(str(d))


# --------------------------------------------------------------------------------------------
# FGVC-Aircraft
# --------------------------------------------------------------------------------------------
def test_fgvc_aircraft_splits_and_annotations(aircraft_root: Path) -> None:
    get = DATASETS.get("fgvc-aircraft")
    raw = get(str(aircraft_root))
    assert raw.class_names == AIR_VARIANTS and raw.options["split"] == "trainval"
    assert [y for _, y in raw.train.samples] == [0, 1, 2, 0, 1, 2]  # train rows then val rows
    assert _labels(raw.test) == [("1000002.jpg", 0), ("1000005.jpg", 1), ("1000008.jpg", 2)]
    train_only = get(str(aircraft_root / "fgvc-aircraft-2013b" / "data"), split="train")
    assert len(train_only.train) == 3 and len(train_only.test) == 3
    # no families.txt: classes are the sorted names of the training split
    fam = get(str(aircraft_root / "fgvc-aircraft-2013b"), annotation="family")
    assert fam.class_names == sorted(AIR_FAMILIES)
    assert [y for _, y in fam.test.samples] == [0, 1, 2]
    with pytest.raises(ConfigError, match="split must be 'trainval'"):
        get(str(aircraft_root), split="val")
    with pytest.raises(ConfigError, match="annotation must be"):
        get(str(aircraft_root), annotation="model")


def test_fgvc_aircraft_errors(aircraft_root: Path) -> None:
    d = aircraft_root / "fgvc-aircraft-2013b" / "data"
    get = DATASETS.get("fgvc-aircraft")
    test_file = d / "images_variant_test.txt"
    text = test_file.read_text()
    test_file.write_text(text + "2000000 A380\n")
    with pytest.raises(DataError, match="image 2000000 has variant 'A380'"):
        get(str(aircraft_root))
    test_file.write_text(text + "2000000 F/A-18\n")
    with pytest.raises(DataError, match=r"images_variant_test\.txt refers to image .*2000000\.jpg"):
        get(str(aircraft_root))
    test_file.write_text(text + "1000000 707-320\n")
    with pytest.raises(DataError, match="1000000 is in both the trainval and the test split"):
        get(str(aircraft_root))
    (d / "images_variant_trainval.txt").unlink()
    with pytest.raises(DataError, match=r"images_variant_trainval\.txt is missing"):
        get(str(aircraft_root))


# --------------------------------------------------------------------------------------------
# Caltech-101
# --------------------------------------------------------------------------------------------
def test_caltech101_split(caltech_root: Path) -> None:
    get = DATASETS.get("caltech101")
    raw = get(str(caltech_root), train_per_class=2)
    assert raw.class_names == ["accordion", "airplanes"]  # BACKGROUND_Google left out
    train, test = {p for p, _ in raw.train.samples}, {p for p, _ in raw.test.samples}
    assert not train & test and len(train | test) == 10
    assert raw.train.labels.bincount().tolist() == [2, 2]
    again = get(str(caltech_root / "101_ObjectCategories"), train_per_class=2)
    assert again.train.samples == raw.train.samples  # seeded
    seeds = {tuple(get(str(caltech_root), train_per_class=2, split_seed=s).train.samples)
             for s in range(6)}  # fmt: skip
    assert len(seeds) > 1
    capped = get(str(caltech_root), train_per_class=2, test_per_class=1)
    assert capped.test.labels.tolist() == [0, 1]
    bg = get(str(caltech_root), train_per_class=2, include_background=True)
    assert bg.class_names == ["BACKGROUND_Google", "accordion", "airplanes"]
    # a class's split does not depend on which other classes are present
    assert [s for s in bg.train.samples if "airplanes" in s[0]] == [
        (p, 2) for p, y in raw.train.samples if y == 1
    ]
    assert get(str(caltech_root), train_per_class=4).options["train_per_class"] == 4


def test_caltech101_errors(caltech_root: Path) -> None:
    get = DATASETS.get("caltech101")
    with pytest.raises(DataError, match="has 5 images, but train_per_class=30 needs at least 31"):
        get(str(caltech_root))
    with pytest.raises(ConfigError, match="train_per_class must be a positive integer"):
        get(str(caltech_root), train_per_class=0)
    with pytest.raises(DataError, match=r"Caltech-101 not found.*101_ObjectCategories"):
        get(str(caltech_root / "nowhere"))
