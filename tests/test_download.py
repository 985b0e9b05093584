"""Dataset downloads against a local HTTP server on 127.0.0.1 (no test reaches the internet).

The server serves archives built in each dataset's official format (tests/dataset_writers.py);
``$SELFKD_DATA_MIRROR`` points every URL at it and the checksum table is patched to the fake
archives' digests (same algorithm as the official entry).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import dataset_writers as w
from selfkd.cli import main
from selfkd.data import download

#: dataset -> (train images, test images, classes) of the fake archives
EXPECTED = {
    "cifar10": (20, 10, 10),
    "cifar100": (200, 100, 100),
    "mnist": (20, 10, 10),
    "fashion-mnist": (20, 10, 10),
    "tiny-imagenet": (6, 3, 3),
    "cub200": (3, 3, 3),
    "stanford-dogs": (3, 3, 3),
    "mit67": (3, 3, 3),
    "fgvc-aircraft": (6, 3, 3),
    "caltech101": (90, 6, 3),
}


def official_files(name: str, tmp: Path) -> dict[str, bytes]:
    """The files the official URLs of ``name`` serve, as tiny fakes in the same format."""
    if name == "cifar10":
        return {"cifar-10-python.tar.gz": w.cifar_archive(tmp, w.write_cifar10)}
    if name == "cifar100":
        return {"cifar-100-python.tar.gz": w.cifar_archive(tmp, w.write_cifar100)}
    if name in ("mnist", "fashion-mnist"):
        return w.mnist_gz_files()
    if name == "tiny-imagenet":
        return {"tiny-imagenet-200.zip": w.tiny_imagenet_zip()}
    if name == "cub200":
        return {"CUB_200_2011.tgz": w.cub_tgz()}
    if name == "stanford-dogs":
        images, lists = w.dogs_tars()
        return {"images.tar": images, "lists.tar": lists}
    if name == "mit67":
        images, train, test = w.mit67_files()
        return {"indoorCVPR_09.tar": images, "TrainImages.txt": train, "TestImages.txt": test}
    if name == "fgvc-aircraft":
        return {"fgvc-aircraft-2013b.tar.gz": w.aircraft_tgz()}
    if name == "caltech101":
        return {"caltech-101.zip": w.caltech_zip()}
    raise KeyError(name)


class Server:
    """A threaded HTTP server on 127.0.0.1 serving ``files`` by name; counts requests.

    ``truncate``: names whose body is cut after half (the Content-Length stays the full size).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                server.requests.append(name)
                body = server.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if name in server.truncate else body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch) -> Iterator[Server]:
    srv = Server()
    monkeypatch.setenv(download.MIRROR_ENV, srv.url)
    yield srv
    srv.close()


def patch_checksums(monkeypatch, files: dict[str, bytes]) -> None:
    """The real table with each file's official checksum replaced by the fake's."""
    table = {}
    for name, src in download.sources().items():
        res = []
        for r in src.resources:
            body = files.get(r.filename)
            if body is not None and r.md5:
                r = dataclasses.replace(r, md5=hashlib.md5(body).hexdigest())
            if body is not None and r.sha256:
                r = dataclasses.replace(r, sha256=hashlib.sha256(body).hexdigest())
            res.append(r)
        table[name] = dataclasses.replace(src, resources=tuple(res))
    monkeypatch.setattr(download, "sources", lambda: table)


def serve(server: Server, monkeypatch, name: str, tmp: Path) -> dict[str, bytes]:
    files = official_files(name, tmp / "build")
    server.files.update(files)
    patch_checksums(monkeypatch, files)
    return files


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: "), err
    return err


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_the_table_names_official_urls_and_checksums():
    table = download.sources()
    assert set(table) == set(EXPECTED)
    c100 = table["cifar100"].resources[0]
    assert c100.urls == ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",)
    assert c100.md5 == "eb9058c3a382ffc7106e4002c42a8d85"  # torchvision's
    for name, src in table.items():
        for r in src.resources:
            assert all(u.startswith("http") and u.endswith(r.filename) for u in r.urls), name
            assert r.md5 or r.sha256 or name == "mit67", (name, r.filename)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_data_get_downloads_verifies_and_reads_back(name, tmp_path, server, monkeypatch, capsys):
    serve(server, monkeypatch, name, tmp_path)
    root = tmp_path / "data"
    assert main(["data", "get", name, "--root", str(root)]) == 0
    out = capsys.readouterr().out
    n_train, n_test, k = EXPECTED[name]
    assert f"{n_train} train / {n_test} test images, {k} classes" in out
    assert leftovers(root) == []  # no work folder, no lock, no archive
    assert not any(p.suffix in (".gz", ".tgz", ".zip", ".tar") for p in root.iterdir())
    # a second call finds it and downloads nothing
    before = len(server.requests)
    assert main(["data", "get", name, "--root", str(root)]) == 0
    assert len(server.requests) == before


def test_checksum_mismatch_removes_the_file_and_writes_nothing(
    tmp_path, server, monkeypatch, capsys
):
    files = serve(server, monkeypatch, "cifar10", tmp_path)
    good = files["cifar-10-python.tar.gz"]
    server.files["cifar-10-python.tar.gz"] = good[:-10] + b"0123456789"
    root = tmp_path / "data"
    assert main(["data", "get", "cifar10", "--root", str(root)]) == 2
    err = one_line_error(capsys)
    url = f"{server.url}/cifar-10-python.tar.gz"
    assert err.startswith(f"error: checksum mismatch for {url} (md5 ")
    assert f"expected {hashlib.md5(good).hexdigest()}); the file was removed" in err
    assert not root.exists()  # nothing written, not even the folder


def test_interrupted_transfer_leaves_nothing_and_a_rerun_starts_clean(
    tmp_path, server, monkeypatch, capsys
):
    files = serve(server, monkeypatch, "cub200", tmp_path)
    size = len(files["CUB_200_2011.tgz"])
    server.truncate.add("CUB_200_2011.tgz")
    root = tmp_path / "data"
    root.mkdir()
    assert main(["data", "get", "cub200", "--root", str(root)]) == 2
    err = one_line_error(capsys)
    assert f"the transfer stopped after {size // 2} of {size} bytes" in err
    assert "nothing was written" in err and str(root) in err
    assert list(root.iterdir()) == []
    # a stale work folder of an attempt killed mid-way is cleared by the rerun
    (root / ".CUB_200_2011.download").mkdir()
    (root / ".CUB_200_2011.download" / "CUB_200_2011.tgz").write_bytes(b"partial")
    server.truncate.clear()
    assert main(["data", "get", "cub200", "--root", str(root)]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["CUB_200_2011"]


def test_interruption_during_extraction_leaves_nothing(tmp_path, server, monkeypatch):
    serve(server, monkeypatch, "tiny-imagenet", tmp_path)
    root = tmp_path / "data"
    root.mkdir()

    def stop(folder: Path, target: Path) -> None:
        assert (folder / "wnids.txt").is_file()  # fully extracted, not yet moved
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "_install", stop)
    with pytest.raises(KeyboardInterrupt):
        download.fetch_dataset("tiny-imagenet", str(root), progress=False, log=lambda s: None)
    assert list(root.iterdir()) == []


def test_offline_names_the_url_and_the_folder(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(download.MIRROR_ENV, f"http://127.0.0.1:{port}")
    root = tmp_path / "data"
    assert main(["data", "get", "cifar100", "--root", str(root)]) == 2
    err = one_line_error(capsys)
    url = f"http://127.0.0.1:{port}/cifar-100-python.tar.gz"
    assert err.startswith(f"error: cannot download CIFAR-100: {url}: it is unreachable (")
    assert "ConnectionRefusedError" in err
    assert "get cifar-100-python.tar.gz by hand" in err and f"put them in {root}," in err
    assert not root.exists()


def test_a_file_put_there_by_hand_is_used_offline(tmp_path, monkeypatch, capsys):
    files = official_files("cifar100", tmp_path / "build")
    patch_checksums(monkeypatch, files)
    monkeypatch.setenv(download.MIRROR_ENV, "http://127.0.0.1:9")  # nothing there
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-100-python.tar.gz").write_bytes(files["cifar-100-python.tar.gz"])
    assert main(["data", "get", "cifar100", "--root", str(root)]) == 0
    assert "200 train / 100 test images" in capsys.readouterr().out
    assert (root / "cifar-100-python" / "meta").is_file()
    # a wrong file by hand is refused by its checksum, not deleted
    other = tmp_path / "other"
    other.mkdir()
    (other / "cifar-100-python.tar.gz").write_bytes(b"not the archive")
    assert main(["data", "get", "cifar100", "--root", str(other)]) == 2
    assert "does not match the official cifar-100-python.tar.gz (md5 " in one_line_error(capsys)
    assert (other / "cifar-100-python.tar.gz").exists()


def test_a_tar_member_escaping_the_folder_is_refused(tmp_path, server, monkeypatch, capsys):
    evil = w.tar_bytes({"cifar-10-batches-py/ok": b"x", "../../escaped": b"x"})
    server.files["cifar-10-python.tar.gz"] = evil
    patch_checksums(monkeypatch, {"cifar-10-python.tar.gz": evil})
    root = tmp_path / "deep" / "data"
    assert main(["data", "get", "cifar10", "--root", str(root)]) == 2
    assert "cannot extract cifar-10-python.tar.gz" in one_line_error(capsys)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "deep").exists()


def test_download_true_in_a_config_trains(tmp_path, server, monkeypatch, tiny_dict, capsys):
    serve(server, monkeypatch, "mnist", tmp_path)
    root = tmp_path / "data"
    tiny_dict["data"] = {"name": "mnist", "root": str(root), "download": True, "batch_size": 8}
    tiny_dict["train"]["epochs"] = 1
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict))
    assert main(["train", "-c", str(config)]) == 0
    assert (root / "mnist" / "train-images-idx3-ubyte.gz").is_file()
    assert (Path(tiny_dict["run"]["out_dir"]) / "tiny" / "final.json").is_file()
    # without download a missing dataset is still the reader's one-line error
    tiny_dict["data"] = {"name": "mnist", "root": str(tmp_path / "none")}
    config.write_text(yaml.safe_dump(tiny_dict))
    assert main(["train", "-c", str(config), "--overwrite"]) == 2
    assert "MNIST not found" in one_line_error(capsys)


def test_a_present_but_broken_dataset_is_not_downloaded_over(tmp_path, server, monkeypatch):
    serve(server, monkeypatch, "cifar10", tmp_path)
    root = tmp_path / "data"
    (root / "cifar-10-batches-py").mkdir(parents=True)  # present, but without its files
    from selfkd.data import build_data
    from selfkd.errors import DataError

    with pytest.raises(DataError, match="CIFAR-10 not found"):
        build_data(name="cifar10", root=str(root), download=True)
    assert server.requests == []


def test_download_true_on_a_dataset_without_source_just_reads_it(tmp_path, server, monkeypatch):
    """One ``data.download: true`` can serve a sweep that also has image folders: such a
    dataset is read as is, and when it is missing its reader's error (not "cannot be
    downloaded") says what to put where."""
    from selfkd.data import build_data
    from selfkd.errors import DataError

    serve(server, monkeypatch, "cifar10", tmp_path)
    root = tmp_path / "folders"
    for split in ("train", "val"):
        for cls in ("ant", "bird"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                (root / split / cls / f"{i}.jpg").write_bytes(w.jpeg(seed=i))
    bundle = build_data(name="imagefolder", root=str(root), download=True, batch_size=2)
    assert bundle.num_classes == 2 and bundle.class_names == ["ant", "bird"]
    with pytest.raises(DataError, match=r"image folder .*nowhere/train is missing"):
        build_data(name="imagefolder", root=str(tmp_path / "nowhere"), download=True)
    assert server.requests == [] and not (tmp_path / "nowhere").exists()


def test_download_of_a_dataset_without_source_is_a_config_error(capsys):
    assert main(["data", "get", "imagefolder"]) == 2
    assert "cannot be downloaded (it reads your own folders)" in one_line_error(capsys)
    assert main(["data", "get", "cifar1000"]) == 2
    assert "unknown dataset 'cifar1000'" in one_line_error(capsys)


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("cifar100", "get it with `selfkd data get cifar100 --root "),
        ("cub200", "get it with `selfkd data get cub200` (or data.download: true)"),
        ("mnist", "get it with `selfkd data get mnist` (or data.download: true)"),
        ("caltech101", "get it with `selfkd data get caltech101` (or data.download: true)"),
    ],
)
def test_a_missing_dataset_says_how_to_download_it(name, hint, tmp_path):
    from selfkd.data import DATASETS
    from selfkd.errors import DataError

    with pytest.raises(DataError) as info:
        DATASETS.get(name)(str(tmp_path))
    assert hint in str(info.value) and "\n" not in str(info.value)


def test_readme_first_gpu_run_is_three_working_lines(capsys):
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"three lines.*?```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    assert len(block) == 3 and block[0].startswith("pip install -e '.[all]'")
    assert block[1] == "selfkd data get cifar100"
    from selfkd.cli import build_parser

    args = build_parser().parse_args(block[1].split()[1:])
    assert args.func.__name__ == "cmd_data_get" and args.name == "cifar100"
    sweep = block[2].split()
    assert sweep[:2] == ["selfkd", "sweep"]
    assert main([*sweep[1:], "--dry-run"]) == 0
    assert "cifar100" in capsys.readouterr().out


def test_progress_bar_and_log_lines(tmp_path, server, monkeypatch, capsys):
    serve(server, monkeypatch, "fashion-mnist", tmp_path)
    lines: list[str] = []
    folder = download.fetch_dataset(
        "fashion-mnist", str(tmp_path / "data"), progress=True, log=lines.append
    )
    assert folder == tmp_path / "data" / "fashion-mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(w.mnist_gz_files())
    assert lines[0] == f"downloading {server.url}/train-images-idx3-ubyte.gz"
    assert lines[-1] == f"Fashion-MNIST is ready in {folder}"
    assert "100%" in capsys.readouterr().err  # the bar reached the end for each file


def test_data_download_does_not_change_the_phase1_key(tiny_dict):
    """Phase-1 runs are shared by key; downloading the data does not change what they learn."""
    from selfkd.config import config_from_dict
    from selfkd.engine.runner import phase1_key

    cfg = config_from_dict(tiny_dict)
    fetched = cfg.copy()
    fetched.data.download = True
    assert phase1_key(fetched) == phase1_key(cfg)


def test_a_resume_may_switch_data_download(tiny_dict):
    """data.download says where the files come from, not what is learnt: a resume may change it
    (any key that shapes training is still refused)."""
    from selfkd.config import config_from_dict
    from selfkd.engine.resume import config_differences

    before = config_from_dict(tiny_dict).to_dict()
    after = config_from_dict(tiny_dict)
    after.data.download = True
    assert config_differences(before, after.to_dict()) == []
    after.data.batch_size = 8
    assert [k for k, *_ in config_differences(before, after.to_dict())] == ["data.batch_size"]


def test_concurrent_downloads_fetch_once(tmp_path, server, monkeypatch):
    """Two processes (DDP ranks) asking at once: the lock makes one download, the other waits
    and finds the dataset there."""
    serve(server, monkeypatch, "cifar10", tmp_path)
    root = tmp_path / "data"
    results: list[Path] = []

    def get() -> None:
        results.append(download.fetch_dataset("cifar10", str(root), log=lambda s: None))

    threads = [threading.Thread(target=get) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [root / "cifar-10-batches-py"] * 3
    assert server.requests == ["cifar-10-python.tar.gz"]
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]


def test_http_error_names_the_status(tmp_path, server, monkeypatch, capsys):
    serve(server, monkeypatch, "mit67", tmp_path)
    del server.files["TestImages.txt"]
    root = tmp_path / "data"
    assert main(["data", "get", "mit67", "--root", str(root)]) == 2
    err = one_line_error(capsys)
    assert f"{server.url}/TestImages.txt: the server answered HTTP 404 Not Found" in err
    assert not root.exists()


def test_a_dataset_the_reader_finds_elsewhere_is_not_downloaded(tmp_path, server, monkeypatch):
    """data.root pointing at the dataset folder itself: found, nothing fetched."""
    serve(server, monkeypatch, "cifar10", tmp_path)
    folder = w.write_cifar10(tmp_path / "mine")
    assert main(["data", "get", "cifar10", "--root", str(folder)]) == 0
    assert server.requests == []
    assert sorted(p.name for p in folder.iterdir())[0] == "batches.meta"
    assert not (folder / "cifar-10-batches-py").exists()
