"""Resuming: a changed config is refused naming its keys; runs stopped before their first
checkpoint (or during AI-KD's phase 1) resume with the advice printed; superiors of another
architecture are refused naming the differing option."""

from __future__ import annotations

import copy
import shlex
import shutil
import signal
from pathlib import Path

import pytest

from helpers import metric_rows, one_line_error, read_final, write_config
from selfkd.cli import main
from selfkd.config import config_from_dict
from selfkd.engine import Trainer, train
from selfkd.errors import DataError
from selfkd.methods import METHODS


class _Stop(Exception):
    """Raised by a callback to stop a run after an epoch (as a crash would)."""


def _stop_after(epochs: int):
    def callback(trainer: Trainer, epoch: int) -> None:
        if epoch == epochs:
            raise _Stop

    return callback


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> tuple[Path, dict, list]:
    """A tiny ce run stopped after epoch 1 of 3 (``runs/tiny``), and the metrics of the same
    run uninterrupted; built once and copied by each test."""
    from helpers import TINY

    root = tmp_path_factory.mktemp("stopped")
    data = copy.deepcopy(TINY)
    data["run"]["out_dir"] = str(root / "runs")
    full = copy.deepcopy(data)
    full["run"]["name"] = "full"
    train(config_from_dict(full), quiet=True)
    with pytest.raises(_Stop):
        Trainer(config_from_dict(data), quiet=True, callbacks=[_stop_after(1)]).fit()
    return root / "runs" / "tiny", data, metric_rows(root / "runs" / "full")


def _copy(stopped_run, tmp_path: Path) -> tuple[Path, dict, list]:
    source, data, full = stopped_run
    data = copy.deepcopy(data)
    data["run"]["out_dir"] = str(tmp_path / "runs")
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(source, run)
    return run, data, full


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["method.name=label_smoothing"], "method.name ('ce' -> 'label_smoothing')"),
        (["run.seed=1"], "run.seed (0 -> 1)"),
        (["train.lr=0.1"], "train.lr (0.05 -> 0.1)"),
        (["data.split_seed=3"], "data.split_seed (0 -> 3)"),
        (["data.batch_size=8"], "data.batch_size (16 -> 8)"),
        (["train.epochs=5"], "train.epochs (3 -> 5)"),
        (
            ["run.amp=bf16", "train.gamma=0.5"],
            "run.amp ('off' -> 'bf16'), train.gamma (0.1 -> 0.5)",
        ),
    ],
)
def test_resume_with_another_config_is_refused_naming_the_keys(
    stopped_run, tmp_path, capsys, overrides, named
):
    run, data, _ = _copy(stopped_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    config = write_config(tmp_path / "c.yaml", data)
    sets = [w for item in overrides for w in ("--set", item)]
    assert main(["train", "-c", str(config), *sets, "--resume", "-q"]) == 2
    err = one_line_error(capsys)
    assert f"cannot resume {run}" in err and named in err, err
    assert f"resume with the config it was trained with ({run / 'config.yaml'})" in err
    after = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # config.yaml, metrics, checkpoints untouched; no final.json
    assert not (run / "final.json").exists()


def test_a_label_smoothing_config_file_cannot_resume_a_ce_run(stopped_run, tmp_path, capsys):
    """The shipped label_smoothing.yaml (its own data and model) on the ce run's folder."""
    run, data, _ = _copy(stopped_run, tmp_path)
    config = Path(__file__).parents[1] / "configs" / "methods" / "label_smoothing.yaml"
    sets = ["--set", f"run.out_dir={data['run']['out_dir']}", "--set", "run.name=tiny"]
    before = (run / "config.yaml").read_bytes()
    assert main(["train", "-c", str(config), *sets, "--resume", "-q"]) == 2
    err = one_line_error(capsys)
    assert "cannot resume" in err and "method.name ('ce' -> 'label_smoothing')" in err
    assert (run / "config.yaml").read_bytes() == before


def test_execution_settings_may_change_on_resume(stopped_run, tmp_path, capsys):
    """Evaluation batch size, progress, check interval, threads: the resumed run ends with
    the metrics of the uninterrupted run."""
    run, data, full = _copy(stopped_run, tmp_path)
    config = write_config(tmp_path / "c.yaml", data)
    sets = ["data.eval_batch_size=7", "run.progress=off", "run.check_every=1", "run.threads=1"]
    argv = ["train", "-c", str(config), *[w for s in sets for w in ("--set", s)], "--resume", "-q"]
    assert main(argv) == 0
    assert read_final(run)["status"] == "finished"
    assert metric_rows(run) == full


def test_the_runs_own_config_yaml_resumes_it(stopped_run, tmp_path):
    """The advice of the refusal works: RUN/config.yaml (the resolved config, with a moved
    run.out_dir) resumes the run to the metrics of the uninterrupted one."""
    run, data, full = _copy(stopped_run, tmp_path)
    sets = ["--set", f"run.out_dir={data['run']['out_dir']}"]
    assert main(["train", "-c", str(run / "config.yaml"), *sets, "--resume", "-q"]) == 0
    assert metric_rows(run) == full


class _Kill(BaseException):
    """Stands for SIGKILL: nothing in the trainer catches it, nothing is recorded."""


@pytest.mark.parametrize("fault", ["kill", "data_error"])
def test_a_run_stopped_before_its_first_checkpoint_resumes(
    tiny_dict, tmp_path, capsys, monkeypatch, fault
):
    """Killed (or stopped by a data error) during epoch 1: the plain rerun says to pass
    --resume or --overwrite, and --resume then trains it from the start to the metrics of an
    uninterrupted run. A temporary file of a killed checkpoint write is cleaned up."""
    full = copy.deepcopy(tiny_dict)
    full["run"]["name"] = "full"
    train(config_from_dict(full), quiet=True)
    config = write_config(tmp_path / "c.yaml", tiny_dict)
    run = Path(tiny_dict["run"]["out_dir"]) / "tiny"
    ce = METHODS.get("ce")
    original = ce.training_step

    def failing_step(self, model, batch, info):
        if info.global_step == 1:
            (run / "checkpoints" / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
            raise _Kill if fault == "kill" else DataError("image 3 cannot be decoded")
        return original(self, model, batch, info)

    monkeypatch.setattr(ce, "training_step", failing_step)
    if fault == "kill":
        with pytest.raises(_Kill):
            main(["train", "-c", str(config), "-q"])
    else:
        assert main(["train", "-c", str(config), "-q"]) == 2
        assert "image 3 cannot be decoded" in one_line_error(capsys)
        assert read_final(run)["status"] == "failed"
    monkeypatch.undo()
    assert (run / "config.yaml").exists() and not (run / "checkpoints" / "last.pt").exists()

    assert main(["train", "-c", str(config), "-q"]) == 2
    err = one_line_error(capsys)
    assert "stopped before its first checkpoint: pass --resume or --overwrite" in err, err
    assert main(["train", "-c", str(config), "-q", "--resume"]) == 0
    assert read_final(run)["status"] == "finished"
    assert metric_rows(run) == metric_rows(Path(tiny_dict["run"]["out_dir"]) / "full")
    assert not list(run.rglob("*.tmp"))


def test_resume_of_a_run_never_started_is_refused_before_anything_runs(tiny_dict, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_dict)
    assert main(["train", "-c", str(config), "-q", "--resume", "--set", "run.name=tyni"]) == 2
    err = one_line_error(capsys)
    assert "nothing to resume" in err and "tyni" in err and "check run.name" in err
    assert not (Path(tiny_dict["run"]["out_dir"]) / "tyni").exists()


@pytest.mark.parametrize("extra", [[], ["--set", "run.eval_every=2"]])
def test_sigterm_in_aikd_phase1_prints_a_resume_command_that_works(
    tiny_dict, tmp_path, capsys, monkeypatch, extra
):
    """SIGTERM during AI-KD's phase 1 (a plain-CE run): the printed command is shell-quoted
    (a --set with spaces survives) and, pasted back, finishes phase 1 and then trains AI-KD.
    Keys that are not part of the phase-1 key (run.eval_every) may change when phase 1 is
    resumed: phase-1 runs are shared by runs that differ in them."""
    tiny_dict["method"] = {"name": "aikd"}
    tiny_dict["train"]["epochs"] = 2
    del tiny_dict["model"]["options"]
    config = write_config(tmp_path / "aikd yaml.yaml", tiny_dict)
    ce = METHODS.get("ce")
    original = ce.training_step
    fired = []

    def training_step(self, model, batch, info):
        if info.global_step == 4 and not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGTERM)
        return original(self, model, batch, info)

    monkeypatch.setattr(ce, "training_step", training_step)
    code = main(["train", "-c", str(config), "--set", "model.options={width: 4}", "-q"])
    assert code == 128 + signal.SIGTERM and fired
    monkeypatch.undo()
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("resume with: "))
    words = shlex.split(line.removeprefix("resume with: "))
    assert words[:2] == ["selfkd", "train"] and words[-1] == "--resume"
    assert "model.options={width: 4}" in words and str(config) in words
    out = Path(tiny_dict["run"]["out_dir"])
    (phase1,) = (out / "_phase1").glob("*/checkpoints/last.pt")
    assert not (phase1.parents[1] / "final.json").exists()  # phase 1 was interrupted

    assert main([*words[1:], *extra]) == 0
    assert read_final(phase1.parents[1])["status"] == "finished"
    assert read_final(out / "tiny")["status"] == "finished"
    assert read_final(out / "tiny")["method"] == "aikd"


def test_a_superior_of_another_width_is_refused_naming_the_option(tiny_dict, tmp_path, capsys):
    tiny_dict["train"]["epochs"] = 1
    config = write_config(tmp_path / "ce.yaml", tiny_dict)
    assert main(["train", "-c", str(config), "-q"]) == 0
    last = Path(tiny_dict["run"]["out_dir"]) / "tiny" / "checkpoints" / "last.pt"
    tiny_dict["run"]["name"] = "student"
    tiny_dict["model"]["options"]["width"] = 8
    tiny_dict["method"] = {"name": "aikd", "superior": str(last)}
    config = write_config(tmp_path / "aikd.yaml", tiny_dict)
    capsys.readouterr()
    assert main(["train", "-c", str(config), "-q"]) == 2
    err = one_line_error(capsys)
    assert f"checkpoint {last} holds another model than this run builds" in err, err
    assert "model.options.width=4 (this run: 8)" in err and "fingerprint" not in err
    student = Path(tiny_dict["run"]["out_dir"]) / "student"
    assert not student.exists()  # the refused run leaves no folder behind
    # the lock was released: the corrected run trains in the same process
    assert main(["train", "-c", str(config), "-q", "--set", "model.options.width=4"]) == 0
    assert read_final(student)["status"] == "finished"


def test_a_second_ctrl_c_prints_a_command_that_works(stopped_run, tmp_path, capsys, monkeypatch):
    """KeyboardInterrupt (a second Ctrl-C): with a checkpoint the printed command resumes;
    before anything was saved it is the plain command (--resume would find nothing)."""
    import selfkd.engine.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    run, data, _ = _copy(stopped_run, tmp_path)
    config = write_config(tmp_path / "c.yaml", data)
    monkeypatch.setattr(runner, "train", interrupted)
    assert main(["train", "-c", str(config), "-q"]) == 130
    err = capsys.readouterr().err
    assert f"the last checkpoint is {run}/checkpoints/last.pt" in err
    assert f"resume with: selfkd train --config {config} --resume" in err

    assert main(["train", "-c", str(config), "-q", "--set", "run.name=other"]) == 130
    err = capsys.readouterr().err
    line = f"start again with: selfkd train --config {config} --set run.name=other"
    assert line in err and "--resume" not in err
    monkeypatch.undo()
    assert main([*line.removeprefix("start again with: selfkd ").split(), "-q"]) == 0
