"""Writers of tiny datasets in their official on-disk formats (and archives of them).

Used by the pickle-safety and download tests: each writer produces the files the official
archive holds, with the same names and folder structure, only far fewer (and smaller) images.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_NAMES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def pickle_file(path: Path, obj: object) -> None:
    """Pickle ``obj`` the way the official CIFAR files are (protocol 2)."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar_images(n: int, offset: int) -> np.ndarray:
    """N×3072 uint8 images whose first pixel encodes the global image number."""
    data = np.random.default_rng(offset).integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, 0] = (np.arange(n) + offset) % 256
    return data


def write_cifar10(root: Path, meta: object | None = None) -> Path:
    """``root/cifar-10-batches-py`` with 5 train batches of 4 images and a test batch of 10."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [n.encode() for n in CIFAR10_NAMES]
    pickle_file(d / "batches.meta", meta or {b"label_names": names, b"num_cases_per_batch": 4})
    for i in range(1, 6):
        offset = 4 * (i - 1)
        labels = [(offset + j) % 10 for j in range(4)]
        pickle_file(d / f"data_batch_{i}", {b"data": cifar_images(4, offset), b"labels": labels})
    pickle_file(d / "test_batch", {b"data": cifar_images(10, 100), b"labels": list(range(10))})
    return d


def write_cifar100(root: Path) -> Path:
    """``root/cifar-100-python`` with 2 train images and 1 test image per fine class."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    fine = [f"fine{i}".encode() for i in range(100)]
    coarse = [f"coarse{i}".encode() for i in range(20)]
    pickle_file(d / "meta", {b"fine_label_names": fine, b"coarse_label_names": coarse})
    for split, per_class, offset in (("train", 2, 0), ("test", 1, 1000)):
        labels = [i % 100 for i in range(100 * per_class)]
        pickle_file(
            d / split,
            {
                b"data": cifar_images(len(labels), offset),
                b"fine_labels": labels,
                b"coarse_labels": [y // 5 for y in labels],
            },
        )
    return d


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file: big-endian magic, one uint32 per dimension, then the uint8 data."""
    head = struct.pack(">i", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    return head + array.astype(np.uint8).tobytes()


def mnist_gz_files(n_train: int = 20, n_test: int = 10) -> dict[str, bytes]:
    """The four gzipped IDX files of (Fashion-)MNIST, 28×28, labels 0..9."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        out[f"{split}-images-idx3-ubyte.gz"] = gzip.compress(idx_bytes(images, 2051))
        out[f"{split}-labels-idx1-ubyte.gz"] = gzip.compress(idx_bytes(labels, 2049))
    return out


def jpeg(seed: int, size: int = 8) -> bytes:
    """A small RGB JPEG."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


Files = dict[str, bytes]


def tar_bytes(files: Files, mode: str = "w:gz") -> bytes:
    """A tar archive (gzipped by default) of ``{member path: content}``; folders implied."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        dirs: set[str] = set()
        for name in files:
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def zip_bytes(files: Files) -> bytes:
    """A zip archive of ``{member path: content}``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return buf.getvalue()


def cifar_archive(root: Path, writer: Callable[[Path], Path]) -> bytes:
    """The official ``cifar-*-python.tar.gz``: the dataset folder at the archive's top level."""
    d = writer(root)
    return tar_bytes({f"{d.name}/{p.name}": p.read_bytes() for p in sorted(d.iterdir())})


def tiny_imagenet_zip(classes: int = 3, per_class: int = 2) -> bytes:
    """``tiny-imagenet-200.zip``: wnids.txt, words.txt, train/<wnid>/images, val/ annotations."""
    wnids = [f"n{i:08d}" for i in range(classes)]
    top = "tiny-imagenet-200"
    files: Files = {
        f"{top}/wnids.txt": "\n".join(wnids).encode() + b"\n",
        f"{top}/words.txt": "".join(
            f"{w}\tthing{i}, other\n" for i, w in enumerate(wnids)
        ).encode(),
    }
    ann = []
    for i, w in enumerate(wnids):
        for j in range(per_class):
            files[f"{top}/train/{w}/images/{w}_{j}.JPEG"] = jpeg(10 * i + j)
        files[f"{top}/val/images/val_{i}.JPEG"] = jpeg(100 + i)
        ann.append(f"val_{i}.JPEG\t{w}\t0\t0\t7\t7")
    files[f"{top}/val/val_annotations.txt"] = ("\n".join(ann) + "\n").encode()
    files[f"{top}/test/images/test_0.JPEG"] = jpeg(999)
    return zip_bytes(files)


def cub_tgz(classes: int = 3, per_class: int = 2) -> bytes:
    """``CUB_200_2011.tgz``: the four id tables and images/<NNN.name>/*.jpg."""
    top = "CUB_200_2011"
    files: Files = {}
    images, split, labels, class_lines = [], [], [], []
    image_id = 0
    for c in range(1, classes + 1):
        folder = f"{c:03d}.Bird_{c}"
        class_lines.append(f"{c} {folder}")
        for j in range(per_class):
            image_id += 1
            rel = f"{folder}/Bird_{c}_{j}.jpg"
            files[f"{top}/images/{rel}"] = jpeg(image_id)
            images.append(f"{image_id} {rel}")
            split.append(f"{image_id} {1 if j else 0}")
            labels.append(f"{image_id} {c}")
    for name, lines in (
        ("images.txt", images),
        ("train_test_split.txt", split),
        ("image_class_labels.txt", labels),
        ("classes.txt", class_lines),
    ):
        files[f"{top}/{name}"] = ("\n".join(lines) + "\n").encode()
    return tar_bytes(files)


def dogs_tars(classes: int = 3, per_class: int = 2) -> tuple[bytes, bytes]:
    """Stanford Dogs ``images.tar`` (Images/<wnid>-<breed>/*.jpg) and ``lists.tar`` (.mat)."""
    from scipy.io import savemat

    files: Files = {}
    lists: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for c in range(classes):
        folder = f"n0208{c:04d}-breed_{c}"
        for j in range(per_class):
            rel = f"{folder}/{folder.split('-')[0]}_{j}.jpg"
            files[f"Images/{rel}"] = jpeg(20 * c + j)
            split = "train" if j else "test"
            lists[split][0].append(rel)
            lists[split][1].append(c + 1)
    mats: Files = {}
    for split, (paths, labels) in lists.items():
        buf = io.BytesIO()
        cells = np.empty((len(paths), 1), dtype=object)
        for i, p in enumerate(paths):
            cells[i, 0] = np.array([p])
        savemat(buf, {"file_list": cells, "labels": np.array(labels, dtype=np.uint8)[:, None]})
        mats[f"{split}_list.mat"] = buf.getvalue()
    return tar_bytes(files, "w"), tar_bytes(mats, "w")


def mit67_files(classes: int = 3, per_class: int = 2) -> tuple[bytes, bytes, bytes]:
    """MIT67 ``indoorCVPR_09.tar`` (Images/<class>/*.jpg), TrainImages.txt, TestImages.txt."""
    files: Files = {}
    train, test = [], []
    for c in range(classes):
        for j in range(per_class):
            rel = f"scene{c}/img_{j}.jpg"
            files[f"Images/{rel}"] = jpeg(30 * c + j)
            (train if j else test).append(rel)
    return (
        tar_bytes(files, "w"),
        ("\n".join(train) + "\n").encode(),
        ("\n".join(test) + "\n").encode(),
    )


def aircraft_tgz(variants: int = 3, per_split: int = 1) -> bytes:
    """``fgvc-aircraft-2013b.tar.gz``: data/images/<id>.jpg, images_variant_<split>.txt, ..."""
    top = "fgvc-aircraft-2013b/data"
    names = [f"7{i}7-{i}00" for i in range(variants)]
    files: Files = {f"{top}/variants.txt": ("\n".join(names) + "\n").encode()}
    image = 1000000
    for split in ("train", "val", "test"):
        lines = []
        for name in names:
            for _ in range(per_split):
                image += 1
                files[f"{top}/images/{image:07d}.jpg"] = jpeg(image)
                lines.append(f"{image:07d} {name}")
        files[f"{top}/images_variant_{split}.txt"] = ("\n".join(lines) + "\n").encode()
    trainval = files[f"{top}/images_variant_train.txt"] + files[f"{top}/images_variant_val.txt"]
    files[f"{top}/images_variant_trainval.txt"] = trainval
    return tar_bytes(files)


def caltech_zip(classes: int = 3, per_class: int = 32) -> bytes:
    """``caltech-101.zip``: caltech-101/101_ObjectCategories.tar.gz (+ Annotations.tar)."""
    inner: Files = {}
    for c in range(classes):
        for j in range(per_class):
            inner[f"101_ObjectCategories/class_{c}/image_{j:04d}.jpg"] = jpeg(40 * c + j)
    inner["101_ObjectCategories/BACKGROUND_Google/image_0001.jpg"] = jpeg(7)
    annotations = tar_bytes({"Annotations/class_0/annotation_0001.mat": b"x"}, "w")
    return zip_bytes(
        {
            "caltech-101/101_ObjectCategories.tar.gz": tar_bytes(inner),
            "caltech-101/Annotations.tar": annotations,
            "caltech-101/show_annotation.m": b"% matlab\n",
        }
    )
