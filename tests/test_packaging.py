"""Packaging: configs shipped in the package and found by name, `selfkd configs`, the wheel's
contents, an install into a fresh virtual environment, LICENSE and extras."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import selfkd
from selfkd.cli import main
from selfkd.config import load_config
from selfkd.engine import loggers as L
from selfkd.errors import ConfigError
from selfkd.shipped import configs_root, copy_configs, list_configs, resolve_config
from selfkd.sweep import load_sweep

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
NAMES = sorted(p.relative_to(CONFIGS).with_suffix("").as_posix() for p in CONFIGS.rglob("*.yaml"))


def test_the_package_configs_are_the_top_level_configs():
    assert configs_root().resolve() == CONFIGS.resolve()  # one copy: src/selfkd/configs links
    assert list_configs() == NAMES


def test_a_config_by_name_from_any_folder_equals_the_file(tmp_path, monkeypatch):
    by_path = load_config(CONFIGS / "fashion_mnist" / "ce.yaml").to_dict()
    monkeypatch.chdir(tmp_path)
    assert load_config("fashion_mnist/ce").to_dict() == by_path
    assert load_config("fashion_mnist/ce.yaml").to_dict() == by_path
    assert load_config("configs/fashion_mnist/ce.yaml").to_dict() == by_path  # README spelling
    sweep = load_sweep("paper/aikd/table2_3_cifar100")
    assert len(sweep.runs) == 30


def test_a_file_beats_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fashion_mnist").mkdir()
    (tmp_path / "fashion_mnist" / "ce.yaml").write_text("method: {name: cskd}\n")
    assert load_config("fashion_mnist/ce.yaml").method["name"] == "cskd"


def test_unknown_name_and_escapes_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("fashion_mnist/nope", "../pyproject", "../../README"):
        with pytest.raises(ConfigError) as err:
            resolve_config(name)
        assert str(err.value) == (
            f"config file not found: {name} (nor a shipped config of that name; "
            "`selfkd configs list` shows them)"
        )


def test_train_on_a_sweep_name_says_to_sweep_it(capsys):
    assert main(["train", "-c", "paper/aikd/table2_3_cifar100"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: paper/aikd/table2_3_cifar100 is a sweep file (it has grid: or runs:), not a "
        "config; run it with `selfkd sweep paper/aikd/table2_3_cifar100`"
    )


def test_configs_list_prints_every_name(capsys):
    assert main(["configs", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == NAMES
    kinds = {line.split()[0]: line.split()[1] for line in lines}
    assert kinds["paper/aikd/table2_3_cifar100"] == "sweep"
    assert kinds["fashion_mnist/ce"] == "config"
    assert kinds["methods/_synthetic"] == "base"


def test_configs_copy_brings_the_bases_and_refuses_to_overwrite(tmp_path, capsys):
    dest = tmp_path / "mine"
    assert main(["configs", "copy", "paper/aikd/table2_3_cifar100", "--to", str(dest)]) == 0
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.yaml"))
    assert copied == [
        "paper/aikd/table2_3_cifar100.yaml",
        "paper/base/cifar100.yaml",
        "paper/base/protocol.yaml",
    ]
    shipped = load_sweep(CONFIGS / "paper/aikd/table2_3_cifar100.yaml")
    mine = load_sweep(dest / "paper/aikd/table2_3_cifar100.yaml")
    assert [r.config.to_dict() for r in mine.runs] == [r.config.to_dict() for r in shipped.runs]
    capsys.readouterr()
    assert main(["configs", "copy", "paper/base/cifar100", "--to", str(dest)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {dest / 'paper/base/cifar100.yaml'} already exists; pass --overwrite or "
        "choose another --to"
    )
    assert main(["configs", "copy", "paper/base", "--to", str(dest), "--overwrite"]) == 0


def test_configs_copy_of_everything(tmp_path):
    written = copy_configs([], tmp_path)
    assert sorted(p.relative_to(tmp_path).with_suffix("").as_posix() for p in written) == NAMES
    with pytest.raises(ConfigError, match="no shipped config or folder named 'nope'"):
        copy_configs(["nope"], tmp_path / "x")


# --- metadata: LICENSE, extras, version ---------------------------------------------------------
def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_file_matches_the_metadata():
    project = _pyproject()["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "the selfkd authors" in text


def test_every_tracker_client_has_its_extra_and_dev_has_all():
    extras = _pyproject()["project"]["optional-dependencies"]
    for name, (_, extra) in L.CLIENTS.items():
        assert extra in extras, name
        assert extra in extras["all"][0], name
    assert "scipy" in extras["datasets"][0]  # stanford-dogs reads .mat lists
    assert any(e.startswith("safetensors") for e in extras["export"])
    assert "selfkd[all]" in extras["dev"]


# --- the wheel --------------------------------------------------------------------------------
def _source_copy(dest: Path) -> Path:
    """The files a build reads, copied (the src/selfkd/configs link kept as a link)."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(ROOT / "src", dest / "src", symlinks=True, ignore=skip)
    shutil.copytree(CONFIGS, dest / "configs", ignore=skip)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("build")
    source = _source_copy(work / "src-copy")
    out = work / "dist"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (found,) = out.glob("selfkd-*.whl")
    return found


def test_the_wheel_carries_every_config_the_license_and_the_version(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(
        n.removeprefix("selfkd/configs/").removesuffix(".yaml")
        for n in names
        if n.startswith("selfkd/configs/")
    )
    assert shipped == NAMES
    info = f"selfkd-{selfkd.__version__}.dist-info"
    assert f"{info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert f"Version: {selfkd.__version__}\n" in metadata
    assert "License-Expression: MIT\n" in metadata
    assert 'Requires-Dist: wandb>=0.31; extra == "wandb"' in metadata


@pytest.mark.slow
def test_a_fresh_install_runs_a_shipped_config_by_name_from_another_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # reuse torch & co. from this environment: its site-packages as a plain path (its own .pth
    # files, such as this checkout's editable install, are not read)
    here = sysconfig.get_paths()["purelib"]
    there = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(there, "reuse-test-env.pth").write_text(here + "\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [str(python), "-c", "import selfkd; print(selfkd.__file__)"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the installed copy, not this checkout
    run = subprocess.run(
        [
            str(venv / "bin" / "selfkd"),
            "train",
            "-c",
            "methods/ce",
            "-q",
            "--set",
            "train.epochs=1",
            "--set",
            "run.threads=1",
            "--set",
            "run.out_dir=runs",
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    final = elsewhere / "runs" / "smoke-ce" / "final.json"
    assert '"status": "finished"' in final.read_text()
    assert '"git_commit": null' in final.read_text()  # no checkout: no commit to record


def test_stanford_dogs_without_scipy_names_the_extra(tmp_path, monkeypatch):
    from selfkd.data.finegrained import _read_dogs_list
    from selfkd.errors import DataError

    monkeypatch.setitem(sys.modules, "scipy.io", None)
    path = tmp_path / "train_list.mat"
    path.write_bytes(b"")
    with pytest.raises(DataError) as err:
        _read_dogs_list(path, tmp_path / "Images", "stanford-dogs", "")
    assert str(err.value) == (
        "stanford-dogs: reading train_list.mat needs scipy; pip install 'selfkd[datasets]' "
        "(or scipy)"
    )
