"""Download datasets on request (``selfkd data get NAME``, ``data.download: true``).

Every dataset selfkd reads from disk has a :class:`Source`: the official files (URL, checksum)
and the folder the reader looks for. CIFAR-10/100, MNIST and Fashion-MNIST take their URLs and
md5 sums from ``torchvision.datasets`` (whose on-disk layout is the one our readers read: the
``cifar-*-python`` folders, the four gzipped IDX files); FGVC-Aircraft and Caltech-101 use the
archives torchvision downloads; Tiny-ImageNet, CUB-200-2011, Stanford Dogs and MIT67 use their
official archives with the checksums published alongside them (MIT67 publishes none: its files
are checked by extracting them and by their layout).

How a download proceeds, so that a failure never leaves a half-written dataset:

1. under a lock (``.<folder>.download.lock`` beside the dataset folder, so concurrent processes,
   e.g. DDP ranks, download once), a stale work folder of an interrupted earlier attempt is
   removed: a rerun starts clean;
2. each file is streamed (with a progress bar on a terminal) into the work folder
   ``.<folder>.download/`` beside the target, its length checked against ``Content-Length``
   and its checksum verified **before** anything is extracted; a mismatch removes the file;
3. archives are extracted inside the work folder (tar members that would land outside it are
   refused), the expected layout is checked, and the finished folder is renamed onto the
   target in one step; the work folder is removed in every case.

A file already placed by hand beside the target (e.g. ``data/cifar-100-python.tar.gz``) is
used instead of downloading, after the same checksum check: that is the offline route the
error messages name. ``$SELFKD_DATA_MIRROR`` replaces every URL by ``<mirror>/<file name>``
(a local mirror, or a test server).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from selfkd.errors import ConfigError, DataError
from selfkd.locks import exclusive_lock

__all__ = ["SOURCES", "Resource", "Source", "fetch_dataset", "load_with_download", "sources"]

MIRROR_ENV = "SELFKD_DATA_MIRROR"
TIMEOUT_S = 60
CHUNK = 1 << 20


@dataclass(frozen=True)
class Resource:
    """One official file: its name, where to get it, and its checksum (md5 or sha256)."""

    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Source:
    """How to get one dataset: its files and where the reader expects the result."""

    dataset: str
    title: str
    page: str
    resources: tuple[Resource, ...]
    #: data.root (or None) -> the folder the reader reads
    target: Callable[[str | None], Path]
    #: (downloaded files by name, work folder) -> the finished folder to move onto the target
    assemble: Callable[[dict[str, Path], Path], Path]
    #: whether the target already holds the dataset (default: the folder exists)
    present: Callable[[Path], bool] = lambda target: target.is_dir()


# --- targets ------------------------------------------------------------------------------
def _data_base(root: str | None) -> Path:
    """``data.root``, else ``$SELFKD_DATA``, else ``./data`` (absolute)."""
    base = root if root is not None else os.environ.get("SELFKD_DATA") or "data"
    return Path(base).expanduser().absolute()


def _under_base(folder: str) -> Callable[[str | None], Path]:
    return lambda root: _data_base(root) / folder


def _idx_target(name: str, env: str) -> Callable[[str | None], Path]:
    def target(root: str | None) -> Path:
        if root is not None:
            return Path(root).expanduser().absolute() / name
        from selfkd.data.idx import _root

        return _root(None, env, f"/usr/share/datasets/{name}", f"data/{name}")

    return target


IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")  # fmt: skip


def _idx_present(target: Path) -> bool:
    from selfkd.data.idx import _find

    return all(_find([target], stem) is not None for stem in IDX_STEMS)


# --- extraction ---------------------------------------------------------------------------
def _extract(archive: Path, into: Path) -> None:
    """Extract a zip or (compressed) tar archive into ``into``; DataError when corrupt/unsafe."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    dest = (into / member).resolve()
                    if not dest.is_relative_to(into.resolve()):
                        raise DataError(
                            f"archive {archive.name} holds {member!r}, which would be written "
                            "outside its folder; refusing to extract it"
                        )
                zf.extractall(into)
        else:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(into, filter="data")
    except DataError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise DataError(
            f"cannot extract {archive.name} ({reason}); the file is corrupt or not the official "
            "archive; nothing was written"
        ) from None


def _expect(path: Path, archive: str) -> Path:
    if not path.exists():
        raise DataError(
            f"{archive} does not contain {path.name}/ as the official archive does; it is not "
            "the expected file; nothing was written"
        )
    return path


def _one_folder(folder: str) -> Callable[[dict[str, Path], Path], Path]:
    """Extract the single archive; the result is its top-level ``folder``."""

    def assemble(files: dict[str, Path], work: Path) -> Path:
        ((name, archive),) = files.items()
        _extract(archive, work / "x")
        return _expect(work / "x" / folder, name)

    return assemble


def _idx_files(files: dict[str, Path], work: Path) -> Path:
    out = work / "out"
    out.mkdir()
    for name, path in files.items():
        shutil.copyfile(path, out / name)
    return out


def _dogs(files: dict[str, Path], work: Path) -> Path:
    out = work / "x"
    for name in ("images.tar", "lists.tar"):
        _extract(files[name], out)
    _expect(out / "Images", "images.tar")
    _expect(out / "train_list.mat", "lists.tar")
    return out


def _mit67(files: dict[str, Path], work: Path) -> Path:
    out = work / "x"
    _extract(files["indoorCVPR_09.tar"], out)
    if not (out / "Images").is_dir() and (out / "indoorCVPR_09" / "Images").is_dir():
        os.rename(out / "indoorCVPR_09" / "Images", out / "Images")
    _expect(out / "Images", "indoorCVPR_09.tar")
    for name in ("TrainImages.txt", "TestImages.txt"):
        shutil.copyfile(files[name], out / name)
    return out


def _caltech(files: dict[str, Path], work: Path) -> Path:
    _extract(files["caltech-101.zip"], work / "zip")
    inner = work / "zip" / "caltech-101" / "101_ObjectCategories.tar.gz"
    if not inner.is_file():
        found = sorted((work / "zip").rglob("101_ObjectCategories.tar.gz"))
        inner = found[0] if found else inner
    _expect(inner, "caltech-101.zip")
    _extract(inner, work / "x")
    return _expect(work / "x" / "101_ObjectCategories", inner.name)


# --- the table ----------------------------------------------------------------------------
@lru_cache(maxsize=1)
def sources() -> dict[str, Source]:
    """Every downloadable dataset by its registry name."""
    from torchvision import datasets as tvd

    def cifar(cls: Any, name: str, title: str) -> Source:
        res = Resource(cls.filename, (cls.url,), md5=cls.tgz_md5)
        return Source(
            name, title, "https://www.cs.toronto.edu/~kriz/cifar.html", (res,),
            _under_base(cls.base_folder), _one_folder(cls.base_folder),
        )  # fmt: skip

    def idx(cls: Any, name: str, title: str, page: str, env: str) -> Source:
        res = tuple(
            Resource(f, tuple(m + f for m in cls.mirrors), md5=md5) for f, md5 in cls.resources
        )
        return Source(name, title, page, res, _idx_target(name, env), _idx_files, _idx_present)

    def archive(name: str, title: str, page: str, url: str, folder: str, **checksum: str) -> Source:
        res = Resource(url.rsplit("/", 1)[1], (url,), **checksum)
        return Source(name, title, page, (res,), _under_base(folder), _one_folder(folder))

    dogs = "http://vision.stanford.edu/aditya86/ImageNetDogs/"
    mit = "http://web.mit.edu/torralba/www/"
    caltech = "https://data.caltech.edu/records/"
    table = [
        cifar(tvd.CIFAR10, "cifar10", "CIFAR-10"),
        cifar(tvd.CIFAR100, "cifar100", "CIFAR-100"),
        idx(tvd.MNIST, "mnist", "MNIST", "http://yann.lecun.com/exdb/mnist/", "SELFKD_MNIST"),
        idx(
            tvd.FashionMNIST,
            "fashion-mnist",
            "Fashion-MNIST",
            "https://github.com/zalandoresearch/fashion-mnist",
            "SELFKD_FASHION_MNIST",
        ),
        archive(
            "tiny-imagenet",
            "Tiny-ImageNet",
            "http://cs231n.stanford.edu/",
            "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
            "tiny-imagenet-200",
            md5="90528d7ca1a48142e341f4ef8d21d0de",
        ),
        archive(
            "cub200",
            "CUB-200-2011",
            "https://www.vision.caltech.edu/datasets/cub_200_2011/",
            caltech + "65de6-vp158/files/CUB_200_2011.tgz",
            "CUB_200_2011",
            md5="97eceeb196236b17998738112f37df78",
        ),
        Source(
            "stanford-dogs",
            "Stanford Dogs",
            dogs,
            (
                Resource(
                    "images.tar",
                    (dogs + "images.tar",),
                    sha256="a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58",
                ),
                Resource(
                    "lists.tar",
                    (dogs + "lists.tar",),
                    sha256="34b47cacd9a98b5d150e084f24d29391c084c55272295ec65c85651bc35f4d6c",
                ),
            ),
            _under_base("stanford-dogs"),
            _dogs,
        ),
        Source(
            "mit67",
            "MIT67",
            mit + "indoor.html",
            (
                Resource(
                    "indoorCVPR_09.tar",
                    ("http://groups.csail.mit.edu/vision/LabelMe/NewImages/indoorCVPR_09.tar",),
                ),
                Resource("TrainImages.txt", (mit + "TrainImages.txt",)),
                Resource("TestImages.txt", (mit + "TestImages.txt",)),
            ),
            _under_base("mit67"),
            _mit67,
        ),
        archive(
            "fgvc-aircraft",
            "FGVC-Aircraft",
            "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
            tvd.FGVCAircraft._URL,
            "fgvc-aircraft-2013b",
            md5="d4acdd33327262359767eeaa97a4f732",
        ),
        Source(
            "caltech101",
            "Caltech-101",
            caltech + "mzrjq-6wc02",
            (
                Resource(
                    "caltech-101.zip",
                    (caltech + "mzrjq-6wc02/files/caltech-101.zip",),
                    md5="3138e1922a9193bfa496528edbbc45d0",
                ),
            ),
            _under_base("101_ObjectCategories"),
            _caltech,
        ),
    ]
    return {s.dataset: s for s in table}


class _Sources:
    """Read-only view of :func:`sources` (built lazily: it imports torchvision.datasets)."""

    def __contains__(self, name: object) -> bool:
        return name in sources()

    def __getitem__(self, name: str) -> Source:
        return sources()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sources())


SOURCES = _Sources()


def source(name: str) -> Source:
    """The :class:`Source` of dataset ``name`` (canonical or alias); ConfigError if none."""
    from selfkd.data.registry import DATASETS

    canonical = DATASETS.canonical(name)
    if canonical not in SOURCES:
        why = {
            "imagefolder": "it reads your own folders",
            "synthetic": "it is generated, not stored",
            "imagenet": "image-net.org needs a login: put train/<wnid>/ and val/<wnid>/ (or a "
            "flat val/ with ILSVRC2012_devkit_t12/) in data.root yourself",
        }.get(canonical, "it has no download source")
        raise ConfigError(
            f"dataset {canonical!r} cannot be downloaded ({why}); downloadable: "
            f"{', '.join(SOURCES)}"
        )
    return SOURCES[canonical]


# --- fetching -----------------------------------------------------------------------------
class _TransferError(Exception):
    """A URL could not be fetched completely (unreachable, HTTP error, cut short)."""


def _urls(res: Resource) -> tuple[str, ...]:
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        return (f"{mirror.rstrip('/')}/{res.filename}",)
    return res.urls


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _checksum_problem(path: Path, res: Resource) -> str | None:
    """None when ``path`` matches the checksum of ``res`` (or it has none), else the mismatch."""
    for algo, expected in (("md5", res.md5), ("sha256", res.sha256)):
        if expected:
            found = _digest(path, algo)
            if found != expected:
                return f"{algo} {found}, expected {expected}"
    return None


def _progress_bar(total: int | None, desc: str, enabled: bool) -> Any:
    from torch.hub import tqdm  # tqdm when installed, else torch's minimal fallback

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled)


def _fetch(url: str, dest: Path, progress: bool) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "selfkd"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            total = response.length
            done = 0
            with open(dest, "wb") as out, _progress_bar(total, dest.name, progress) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise _TransferError(f"the server answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, OSError):
            reason = f"{type(reason).__name__}: {reason.strerror or reason}"
        raise _TransferError(f"it is unreachable ({reason})") from None
    except (TimeoutError, http.client.HTTPException, ConnectionError) as exc:
        raise _TransferError(
            f"the transfer failed ({' '.join(f'{type(exc).__name__}: {exc}'.split())})"
        ) from None
    if total is not None and done != total:
        raise _TransferError(f"the transfer stopped after {done} of {total} bytes")


def _obtain(src: Source, res: Resource, parent: Path, work: Path, progress: bool, log) -> Path:
    """The verified file ``res``: placed by hand in ``parent``, else downloaded into ``work``."""
    by_hand = parent / res.filename
    if by_hand.is_file():
        problem = _checksum_problem(by_hand, res)
        if problem:
            raise DataError(
                f"{by_hand} does not match the official {res.filename} ({problem}); delete it "
                "or replace it with the official file, then rerun"
            )
        log(f"using {by_hand} (checksum verified)")
        return by_hand
    dest = work / res.filename
    failures = []
    urls = _urls(res)
    for url in urls:
        log(f"downloading {url}")
        try:
            _fetch(url, dest, progress)
        except _TransferError as exc:
            failures.append(f"{url}: {exc}")
            dest.unlink(missing_ok=True)
            continue
        problem = _checksum_problem(dest, res)
        if problem:
            dest.unlink(missing_ok=True)
            raise DataError(
                f"checksum mismatch for {url} ({problem}); the file was removed and nothing was "
                f"written; rerun to retry, or put the official {res.filename} in {parent}"
            )
        return dest
    names = ", ".join(r.filename for r in src.resources)
    raise DataError(
        f"cannot download {src.title}: {'; '.join(failures)}; nothing was written. Without "
        f"internet, get {names} by hand (from {src.page}) and put them in {parent}, then rerun"
    )


def _install(folder: Path, target: Path) -> None:
    """Move the finished ``folder`` onto ``target``: one rename, or file by file into an
    existing folder (IDX files), never replacing a file already there."""
    if not target.exists():
        os.rename(folder, target)
        return
    for item in sorted(folder.iterdir()):
        if not (target / item.name).exists():
            os.replace(item, target / item.name)


def fetch_dataset(
    name: str, root: str | None = None, *, progress: bool | None = None, log=None
) -> Path:
    """Download (if needed) dataset ``name`` into the folder its reader reads; return it.

    ``root`` is ``data.root`` (None: the reader's default). ``progress`` shows a progress bar
    (default: when stderr is a terminal); ``log`` receives one line per step (default: stderr).
    Raises a one-line DataError when offline, on a checksum mismatch or a corrupt archive;
    in every case of failure nothing is left behind but what was there before.
    """
    src = source(name)
    target = src.target(root)
    if progress is None:
        progress = sys.stderr.isatty()
    if log is None:
        log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if src.present(target):
        return target
    parent = target.parent
    work = parent / f".{target.name}.download"
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(parent / f".{target.name}.download.lock", remove=True):
            if src.present(target):  # another process finished it meanwhile
                return target
            if work.exists():
                shutil.rmtree(work)  # left by an interrupted attempt: start clean
            work.mkdir()
            try:
                files = {
                    r.filename: _obtain(src, r, parent, work, progress, log) for r in src.resources
                }
                if not any(r.md5 or r.sha256 for r in src.resources):
                    log(f"{src.title} publishes no checksum: checked by extraction and layout")
                log(f"extracting into {work}")
                _install(src.assemble(files, work), target)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    except OSError as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise DataError(
            f"cannot write {src.title} into {parent} ({reason}); free space or choose another "
            "folder with --root / data.root; nothing was written"
        ) from None
    finally:
        if not target.exists():  # failed: remove the (empty) folders this call created
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
    log(f"{src.title} is ready in {target}")
    return target


def load_with_download(name: str, root: str | None, load: Callable[[], Any]) -> Any:
    """``load()``; when it fails because the dataset is absent, download it and load again.

    A dataset that is present but broken is not downloaded over: its reader's error stands.
    A dataset without a download source (imagefolder, imagenet, synthetic) is only loaded, so
    that one ``data.download: true`` can serve a sweep over several datasets; when its files
    are missing, its reader's error says where they go.
    """
    if name not in SOURCES:
        return load()
    src = SOURCES[name]
    try:
        return load()
    except DataError:
        if src.present(src.target(root)):
            raise
    fetch_dataset(name, root)
    return load()
