"""The command line: one-line errors with exit status 2, list, train, eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import one_line_error, write_config
from selfkd.cli import main


def test_list_shows_registries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("ce", "aikd", "fashion-mnist", "cifar100", "preact_resnet18", "resnet8"):
        assert f"  {name} " in out


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("method.name=aikdd", "unknown method 'aikdd'"),
        ("model.name=resnet9", "unknown model 'resnet9'"),
        ("data.name=cifar1000", "unknown dataset 'cifar1000'"),
        ("train.epohcs=3", "did you mean: epochs"),
        ("train.lr=fast", "train.lr must be a number"),
        ("method.alpha_x=1", "unknown key method.alpha_x"),
        ("data.options.num_classes=1", "num_classes"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, tiny_dict, capsys, override, expected):
    if override.startswith("method.alpha_x"):
        tiny_dict["method"] = {"name": "aikd"}
    config = write_config(tmp_path / "c.yaml", tiny_dict)
    assert main(["train", "-c", str(config), "--set", override, "-q"]) == 2
    assert expected in one_line_error(capsys)
    run = Path(tiny_dict["run"]["out_dir"]) / "tiny"
    assert not (run / "config.yaml").exists()  # nothing half-written


def test_missing_dataset_files(tmp_path, tiny_dict, capsys):
    tiny_dict["data"] = {"name": "cifar100", "root": str(tmp_path / "nowhere")}
    config = write_config(tmp_path / "c.yaml", tiny_dict)
    assert main(["train", "-c", str(config), "-q"]) == 2
    assert "cifar-100-python" in one_line_error(capsys)


def test_wrong_number_of_classes_in_superior(tmp_path, tiny_dict, capsys):
    config = write_config(tmp_path / "ce.yaml", tiny_dict)
    assert main(["train", "-c", str(config), "-q", "--set", "train.epochs=1"]) == 0
    capsys.readouterr()
    last = Path(tiny_dict["run"]["out_dir"]) / "tiny" / "checkpoints" / "last.pt"
    tiny_dict["run"]["name"] = "student"
    tiny_dict["data"]["options"]["num_classes"] = 5
    tiny_dict["method"] = {"name": "aikd", "superior": str(last)}
    config = write_config(tmp_path / "aikd.yaml", tiny_dict)
    assert main(["train", "-c", str(config), "-q", "--set", "train.epochs=1"]) == 2
    assert "4 classes but this run has 5" in one_line_error(capsys)


def test_missing_superior_checkpoint(tmp_path, tiny_dict, capsys):
    tiny_dict["method"] = {"name": "aikd", "superior": str(tmp_path / "nope.pt")}
    config = write_config(tmp_path / "c.yaml", tiny_dict)
    assert main(["train", "-c", str(config), "-q"]) == 2
    assert "nope.pt not found" in one_line_error(capsys)


def test_train_then_eval(tmp_path, tiny_dict, capsys):
    tiny_dict["data"]["val_size"] = 8
    config = write_config(tmp_path / "c.yaml", tiny_dict)
    assert main(["train", "-c", str(config), "-q", "--set", "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "| ce (" in out and "Top-1 err (%)" in out and "ECE+TS (%)" in out
    run = Path(tiny_dict["run"]["out_dir"]) / "tiny"
    final = json.loads((run / "final.json").read_text())
    assert main(["eval", str(run), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["top1_err"] == pytest.approx(final["test_top1_err"])
    assert evaluated["ece_ts"] == pytest.approx(final["test_ece_ts"], abs=1e-3)
    # the same command again refuses to overwrite the finished run
    assert main(["train", "-c", str(config), "-q", "--set", "train.epochs=2"]) == 2
    assert "already holds a run" in one_line_error(capsys)
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run directory" in one_line_error(capsys)


def test_output_into_a_closed_pipe_is_no_traceback():
    """`selfkd configs list | head -1` where the reader has already gone: selfkd exits quietly
    with 141 (128 + SIGPIPE), no BrokenPipeError traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "selfkd", "configs", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before selfkd (importing torch) writes a byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err
