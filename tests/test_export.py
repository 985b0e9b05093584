"""selfkd.load_model (no dataset read), `selfkd export --format safetensors`, `--version`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import selfkd
from helpers import read_final
from selfkd import metrics as M
from selfkd.cli import main
from selfkd.config import config_from_dict
from selfkd.engine import Trainer
from selfkd.engine.checkpoint import load_checkpoint
from selfkd.engine.evaluate import collect_logits
from selfkd.engine.export import export_run, load_model
from selfkd.errors import CheckpointError, ConfigError, RunDirError


@pytest.fixture
def finished(tiny_dict):
    """A finished tiny run: (trainer, run directory), with the data builders disabled after."""
    tiny_dict["train"]["epochs"] = 2
    trainer = Trainer(config_from_dict(tiny_dict), quiet=True)
    trainer.fit()
    return trainer, trainer.run.path


@pytest.fixture
def no_data(monkeypatch):
    """Any dataset build fails the test."""
    import selfkd.data as data

    def refuse(*args, **kwargs):
        raise AssertionError("the dataset must not be built")

    monkeypatch.setattr(data, "build_data", refuse)
    monkeypatch.setattr(data, "build_data_from_config", refuse)


def _test_logits(model: nn.Module, trainer: Trainer) -> torch.Tensor:
    data = trainer.data
    return collect_logits(model, data.test_loader, data.transform, torch.device("cpu"))[0]


def test_load_model_gives_the_runs_own_logits_without_reading_data(finished, no_data):
    trainer, run = finished
    expected, targets = trainer.test_logits()
    model = selfkd.load_model(run)
    assert not model.training
    assert type(model) is type(trainer.model)
    got = _test_logits(model, trainer)
    assert torch.equal(got, expected)
    # ... and so the test metrics final.json reports
    top1 = M.evaluate_logits(got, targets)["top1_err"]
    assert top1 == pytest.approx(read_final(run)["test_top1_err"])


def test_load_model_takes_a_checkpoint_file_and_best(finished, no_data):
    _, run = finished
    best = run / "checkpoints" / "best.pt"
    state = load_checkpoint(best)["model"]
    for source in (best, run):
        model = load_model(source, which="best")
        loaded = model.state_dict()
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_load_model_on_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    with pytest.raises(RunDirError) as err:
        load_model(tmp_path)
    assert str(err.value) == (
        f"{tmp_path} is not a run directory or a checkpoint (no checkpoints/last.pt in it); "
        "pass the folder a `selfkd train` run wrote, one of its .pt files or an export folder"
    )


def test_load_model_of_a_python_api_model_says_to_build_it(tiny_dict):
    tiny_dict["train"]["epochs"] = 1
    own = nn.Sequential(nn.Flatten(), nn.Linear(144, 4))
    trainer = Trainer(config_from_dict(tiny_dict), model=own, quiet=True)
    trainer.fit()
    with pytest.raises(CheckpointError, match=r"given through the Python API \(Sequential\)"):
        load_model(trainer.run.path)


def test_load_model_refuses_a_file_that_is_no_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"refusing to load .*x\.pt"):
        load_model(path)


# --- export -----------------------------------------------------------------------------------
def test_export_writes_safetensors_weights_and_the_config(finished, no_data):
    from safetensors import safe_open
    from safetensors.torch import load_file

    trainer, run = finished
    weights, config = export_run(run)
    assert (weights, config) == (run / "export" / "model.safetensors", run / "export/config.yaml")
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    tensors = load_file(str(weights))
    assert tensors.keys() == state["model"].keys()
    assert all(torch.equal(tensors[k], state["model"][k]) for k in tensors)
    with safe_open(str(weights), framework="pt") as handle:
        assert handle.metadata()["format"] == "selfkd-export-1"
    written = yaml.safe_load(config.read_text())
    meta = written.pop("meta")
    assert written == state["meta"]["config"]
    assert meta["num_classes"] == 4 and meta["in_channels"] == 1
    assert meta["checkpoint"] == {"file": "last.pt", "epoch": 2}
    # the export loads back into the same model
    assert torch.equal(_test_logits(load_model(run / "export"), trainer), trainer.test_logits()[0])


def test_export_from_the_cli_refuses_to_overwrite(finished, capsys, tmp_path):
    _, run = finished
    out = tmp_path / "exported"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "model.safetensors"), str(out / "config.yaml")]
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {out / 'model.safetensors'} already exists; pass --overwrite to replace it or "
        "--out another folder"
    )
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0


def test_export_without_safetensors_names_the_extra(finished, monkeypatch):
    _, run = finished
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ConfigError) as err:
        export_run(run)
    assert str(err.value) == "export needs safetensors; pip install 'selfkd[export]'"
    assert not (run / "export").exists()


def test_export_of_an_unknown_format_is_refused(finished):
    with pytest.raises(ConfigError, match="unknown export format 'onnx'; choose from safetensors"):
        export_run(finished[1], "onnx")


# --- version ----------------------------------------------------------------------------------
def test_version_prints_the_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"selfkd {selfkd.__version__}"


def test_version_is_the_package_metadata_version():
    from importlib.metadata import version

    assert version("selfkd") == selfkd.__version__


def test_version_from_a_fresh_process():
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "selfkd", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert done.stdout.strip() == f"selfkd {selfkd.__version__}"


def test_load_model_is_the_engine_function():
    assert selfkd.load_model is load_model
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = selfkd.nope  # type: ignore[attr-defined]


def test_import_selfkd_does_not_import_torch():
    import subprocess

    code = "import sys, selfkd; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("which", ["last", "best"])
def test_export_best_or_last(finished, which, tmp_path):
    _, run = finished
    weights, _ = export_run(run, which=which, out=tmp_path / which)
    model = load_model(weights)
    state = load_checkpoint(run / "checkpoints" / f"{which}.pt")["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_loading_refuses_a_safetensors_file_that_is_no_selfkd_export(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="is not a selfkd export"):
        load_model(path)


def test_paths_are_accepted_as_str(finished):
    _, run = finished
    assert isinstance(load_model(str(run)), nn.Module)
    assert Path(export_run(str(run))[0]).is_file()
