"""Run life cycle faults: bad run.* values refused before any work, a full disk (at start and
while writing metrics), a corrupt metrics.jsonl on resume, temporary files left by a killed
write, and diverging runs under run.nonfinite=skip."""

from __future__ import annotations

import copy
import errno
import pathlib
from pathlib import Path

import pytest
import torch

from helpers import metric_rows, one_line_error, read_final, write_config
from selfkd.cli import main
from selfkd.config import config_from_dict
from selfkd.engine import Trainer, train
from selfkd.engine import rundir as rundir_module
from selfkd.errors import RunDirError, TrainingError
from selfkd.methods.base import METHODS, Method, StepOutput


def full_run(tiny_dict: dict) -> list[dict]:
    """Metrics of the tiny run trained uninterrupted (as run ``full``)."""
    data = copy.deepcopy(tiny_dict)
    data["run"]["name"] = "full"
    train(config_from_dict(data), quiet=True)
    return metric_rows(Path(data["run"]["out_dir"]) / "full")


class _Stop(Exception):
    pass


def stop_after(epochs: int):
    def callback(trainer: Trainer, epoch: int) -> None:
        if epoch == epochs:
            raise _Stop

    return callback


# --- bad run.* values: refused before anything is written ------------------------------------
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("run.best_metric=top1err", "run.best_metric 'top1err' is not a per-epoch metric"),
        ("run.best_metric=ece_ts", "choose one of top1_err, top5_err"),
        ("run.best_metric=top5_err", "top5_err needs at least 5 classes, the data has 4"),
        (
            "run.name=" + "n" * 300,
            "run.name is 300 bytes long but a file name can have at most 255",
        ),
        ("run.seed=1e23", "run.seed must be an integer, got '1e23'"),  # YAML: a string
        ("run.seed=1.0e+23", "run.seed must be an integer in [0, 2**63 - 1]"),  # a float
        ("run.seed=-1", "run.seed must be an integer in [0, 2**63 - 1]"),
    ],
)
def test_bad_run_values_are_refused_before_the_first_step(
    tmp_path, tiny_dict, capsys, override, expected
):
    config = write_config(tmp_path / "c.yaml", tiny_dict)
    assert main(["train", "-c", str(config), "--set", override, "-q"]) == 2
    err = one_line_error(capsys)
    assert expected in err, err
    if override == "run.best_metric=top1err":
        assert "(did you mean: top1_err" in err
    out = Path(tiny_dict["run"]["out_dir"])
    assert not (out / "tiny").exists()
    # nothing blocks the corrected command
    assert main(["train", "-c", str(config), "-q", "--set", "train.epochs=1"]) == 0


def test_an_empty_config_file_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text in ("", "# only a comment\n", "{}\n"):
        (tmp_path / "empty.yaml").write_text(text)
        assert main(["train", "-c", "empty.yaml", "-q"]) == 2
        assert "config empty.yaml is empty" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


# --- a full disk --------------------------------------------------------------------------------
def test_a_full_disk_at_start_leaves_no_write_test_file(tiny_dict, monkeypatch):
    real = pathlib.Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == ".write-test":
            self.touch()  # the file is created, the write fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(RunDirError, match=r"No space left on device.*free disk space"):
        train(config_from_dict(tiny_dict), quiet=True)
    run = Path(tiny_dict["run"]["out_dir"]) / "tiny"
    assert not (run / ".write-test").exists()
    assert not (run / "config.yaml").exists()


def test_a_full_disk_while_writing_metrics_is_one_line_and_resumable(
    tiny_dict, tmp_path, capsys, monkeypatch
):
    """The metrics write of epoch 2 fails with ENOSPC: one-line error, exit 2, the run recorded
    as failed, epoch 1's rows and checkpoint intact; --resume then ends like an uninterrupted
    run."""
    full = full_run(tiny_dict)
    config = write_config(tmp_path / "c.yaml", tiny_dict)
    real = rundir_module.atomic_write_text
    writes = []

    def full_disk(path, text):
        if Path(path).name == "metrics.jsonl":
            writes.append(path)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(rundir_module, "atomic_write_text", full_disk)
    assert main(["train", "-c", str(config), "-q"]) == 2
    err = one_line_error(capsys)
    run = Path(tiny_dict["run"]["out_dir"]) / "tiny"
    assert f"could not write {run / 'metrics.jsonl'} (No space left on device)" in err, err
    assert "continue with --resume" in err
    final = read_final(run)
    assert final["status"] == "failed" and "No space left on device" in final["error"]
    assert metric_rows(run) == full[:1]  # what was written before stays
    assert not list(run.rglob("*.tmp"))
    monkeypatch.undo()
    assert main(["train", "-c", str(config), "-q", "--resume"]) == 0
    assert read_final(run)["status"] == "finished"
    assert metric_rows(run) == full


# --- a corrupt metrics.jsonl on resume ----------------------------------------------------------
def test_resume_with_a_truncated_metrics_jsonl(tiny_dict, tmp_path, capsys):
    """A truncated metrics.jsonl is read from metrics.csv (the same rows) and the resumed run
    ends like an uninterrupted one; with metrics.csv broken too it is a one-line error."""
    full = full_run(tiny_dict)
    with pytest.raises(_Stop):
        Trainer(config_from_dict(tiny_dict), quiet=True, callbacks=[stop_after(2)]).fit()
    run = Path(tiny_dict["run"]["out_dir"]) / "tiny"
    jsonl = run / "metrics.jsonl"
    text = jsonl.read_text()
    jsonl.write_text(text[: len(text) - 40])  # cut in the middle of the second row
    config = write_config(tmp_path / "c.yaml", tiny_dict)
    with pytest.warns(UserWarning, match="using the rows of metrics.csv"):
        assert main(["train", "-c", str(config), "-q", "--resume"]) == 0
    assert metric_rows(run) == full

    # both files broken: one line, nothing rewritten
    with pytest.raises(_Stop):
        Trainer(
            config_from_dict(tiny_dict), overwrite=True, quiet=True, callbacks=[stop_after(2)]
        ).fit()
    jsonl.write_text(jsonl.read_text()[:-40])
    csv = run / "metrics.csv"
    csv.write_text(csv.read_text()[:-40])
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "-c", str(config), "-q", "--resume"]) == 2
    err = one_line_error(capsys)
    assert f"{jsonl} is corrupt (JSONDecodeError) and metrics.csv cannot replace it" in err
    after = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


# --- temporary files of a killed write ----------------------------------------------------------
def test_temporary_files_of_killed_writes_are_removed(tiny_dict):
    """``.last.pt.*.tmp`` (a checkpoint write killed half-way) and ``.metrics.csv.*.tmp`` go
    at resume, at the end of a run (also one that fails) and with --overwrite."""
    cfg = config_from_dict(tiny_dict)
    run = Path(cfg.run.out_dir) / "tiny"

    def leave_temporaries(trainer: Trainer, epoch: int) -> None:
        (run / "checkpoints" / f".last.pt.k{epoch}.tmp").write_bytes(b"half")
        (run / f".metrics.csv.k{epoch}.tmp").write_text("half")
        if epoch == 1 and not trainer.resume:
            raise _Stop

    with pytest.raises(_Stop):
        Trainer(cfg, quiet=True, callbacks=[leave_temporaries]).fit()
    assert not list(run.rglob("*.tmp"))  # a failing run cleans up at its end

    # what a SIGKILL during a write leaves (no clean-up ran): removed when the resume starts
    (run / "checkpoints" / ".last.pt.k9.tmp").write_bytes(b"half")
    (run / ".metrics.jsonl.k9.tmp").write_text("half")
    trainer = Trainer(cfg, resume=True, quiet=True, callbacks=[leave_temporaries])
    assert not list(run.rglob("*.tmp"))
    trainer.fit()  # leaves new ones after every epoch: gone at the end
    assert read_final(run)["status"] == "finished"
    assert not list(run.rglob("*.tmp"))

    # --overwrite of a finished run
    (run / "checkpoints" / ".last.pt.zz.tmp").write_bytes(b"half")
    (run / ".final.json.zz.tmp").write_text("half")
    trainer = Trainer(cfg, overwrite=True, quiet=True)
    assert not list(run.rglob("*.tmp"))
    trainer.run.release()


# --- diverging runs -----------------------------------------------------------------------------
def register_nan_grad_method(name: str, at_step: int) -> None:
    """A test method: cross-entropy whose loss stays finite at global step ``at_step`` while
    its gradient is NaN (``sqrt`` of ``|0|``): that optimizer step blows the weights up."""

    class NanGrad(Method):
        def training_step(self, model, batch, info):
            logits = model(batch.inputs)
            loss = torch.nn.functional.cross_entropy(logits, batch.targets)
            if info.global_step == at_step:
                zero = (logits - logits.detach()).abs()  # value 0; d|x|/dx = sign(0) = 0
                loss = loss + zero.sqrt().sum()  # value 0, gradient inf * 0 = NaN
            return StepOutput(loss=loss, logits=logits, targets=batch.targets, terms={"ce": loss})

    NanGrad.name = name
    METHODS.register(name)(NanGrad)


register_nan_grad_method("_nan_grad_at_step_2", at_step=2)  # the last step of epoch 1
register_nan_grad_method("_nan_grad_at_step_0", at_step=0)


@pytest.mark.parametrize("nonfinite", ["skip", "stop"])
def test_weights_diverging_on_a_finite_step_end_with_an_honest_training_error(
    tiny_dict, tmp_path, capsys, nonfinite
):
    """Epoch 1 ends with the step that blows the weights up (its loss is finite): evaluation
    finds NaN logits. That is a TrainingError (exit 2) saying the weights diverged and what to
    try, not a ConfigError about logits; under skip it says what skip cannot do; the run is
    recorded as failed."""
    tiny_dict["method"] = {"name": "_nan_grad_at_step_2"}
    tiny_dict["train"]["epochs"] = 1
    tiny_dict["run"]["nonfinite"] = nonfinite
    config = write_config(tmp_path / "c.yaml", tiny_dict)
    assert main(["train", "-c", str(config), "-q"]) == 2
    err = one_line_error(capsys)
    assert "the test logits after epoch 1 contain NaN or Inf: the model's weights diverged" in err
    assert "lower train.lr, set train.grad_clip" in err
    skip_note = "run.nonfinite=skip only skips steps whose loss is NaN/Inf"
    assert (skip_note in err) == (nonfinite == "skip")
    run = Path(tiny_dict["run"]["out_dir"]) / "tiny"
    final = read_final(run)
    assert final["status"] == "failed" and final["error"].startswith("TrainingError: ")
    assert not (run / "checkpoints" / "last.pt").exists()  # the diverged weights are not saved


def test_skip_stops_at_once_when_the_weights_are_no_longer_finite(tiny_dict):
    """After the weights blew up (global step 0) every loss is NaN: skipping cannot help, so
    the first step to skip (global step 1) already stops, instead of skipping
    run.max_skipped_steps steps in vain."""
    tiny_dict["method"] = {"name": "_nan_grad_at_step_0"}
    tiny_dict["run"]["nonfinite"] = "skip"
    tiny_dict["run"]["max_skipped_steps"] = 1000
    with pytest.raises(TrainingError) as info:
        train(config_from_dict(tiny_dict), quiet=True)
    message = str(info.value)
    assert "non-finite loss nan at epoch 1, step 2 (global step 1)" in message, message
    assert "weights are no longer finite" in message and "skipping steps cannot" in message
    assert "training diverged: lower train.lr, set train.grad_clip" in message


@pytest.mark.parametrize("nonfinite", ["skip", "stop"])
def test_no_checkpoint_holds_weights_that_diverged_on_a_finite_step(tiny_dict, nonfinite):
    """No evaluation after epoch 1 (run.eval_every=2) to notice the NaN weights: the
    end-of-epoch checkpoint write refuses them; last.pt is never written with them."""
    tiny_dict["method"] = {"name": "_nan_grad_at_step_2"}
    tiny_dict["run"]["nonfinite"] = nonfinite
    tiny_dict["run"]["eval_every"] = 2
    with pytest.raises(
        TrainingError, match=r"weights are no longer finite after epoch 1 .*last.pt was not written"
    ):
        train(config_from_dict(tiny_dict), quiet=True)
    run = Path(tiny_dict["run"]["out_dir"]) / "tiny"
    assert not (run / "checkpoints" / "last.pt").exists()
    assert read_final(run)["status"] == "failed"


def test_an_io_error_no_writer_expected_is_one_line(tiny_dict, tmp_path, capsys, monkeypatch):
    """A raw OSError from anywhere in training (here: the method, as a failing disk read
    would): exit 2 with one line naming it, the run recorded as failed."""
    ce = METHODS.get("ce")

    def failing_step(self, model, batch, info):
        raise OSError(errno.EIO, "Input/output error", "/data/img_7.png")

    monkeypatch.setattr(ce, "training_step", failing_step)
    config = write_config(tmp_path / "c.yaml", tiny_dict)
    assert main(["train", "-c", str(config), "-q"]) == 2
    err = one_line_error(capsys)
    run = Path(tiny_dict["run"]["out_dir"]) / "tiny"
    assert f"Input/output error (/data/img_7.png) while training {run}" in err, err
    assert read_final(run)["status"] == "failed"
