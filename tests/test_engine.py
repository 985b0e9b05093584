"""End-to-end engine behaviour on tiny synthetic runs (CPU, deterministic)."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from helpers import assert_resume_is_exact, metric_rows, read_rows, register_nan_method
from selfkd.config import TrainConfig, config_from_dict
from selfkd.engine import train
from selfkd.engine.checkpoint import load_checkpoint, save_checkpoint
from selfkd.engine.optim import lr_at
from selfkd.errors import CheckpointError, RunDirError, TrainingError


def test_run_directory_contents(tiny_dict):
    cfg = config_from_dict(tiny_dict)
    final = train(cfg, quiet=True)
    run = Path(cfg.run.out_dir) / "tiny"
    for name in (
        "config.yaml",
        "metrics.csv",
        "metrics.jsonl",
        "final.json",
        "train.log",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (run / name).is_file(), name
    rows = read_rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert {
        "lr",
        "train_loss",
        "train_ce",
        "train_top1_err",
        "test_top1_err",
        "test_nll",
        "test_ece",
        "test_aurc",
        "train_seconds",
    } <= set(rows[0])
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["epoch", "lr"]
    assert final["status"] == "finished" and final["test_top1_err"] == rows[-1]["test_top1_err"]
    # the resolved config is itself a valid config, with the dataset's normalization recorded
    from selfkd.config import load_config

    resolved = load_config(run / "config.yaml")
    assert resolved.data.normalize is not None and len(resolved.data.normalize["mean"]) == 1
    # lr followed the schedule: milestones 1.5 and 2.25 epochs -> x0.1 from 0-based epoch 2 on
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.05, 0.005])


def test_same_seed_same_metrics(tiny_dict, tmp_path):
    results = []
    for name in ("a", "b"):
        tiny_dict["run"]["name"] = name
        train(config_from_dict(tiny_dict), quiet=True)
        results.append(metric_rows(Path(tiny_dict["run"]["out_dir"]) / name))
    assert results[0] == results[1]
    tiny_dict["run"]["name"], tiny_dict["run"]["seed"] = "c", 1
    train(config_from_dict(tiny_dict), quiet=True)
    other = metric_rows(Path(tiny_dict["run"]["out_dir"]) / "c")
    assert other != results[0]


def test_interrupted_run_resumes_to_identical_metrics(tiny_dict):
    assert_resume_is_exact(tiny_dict, crash_after=1)


def test_existing_run_is_refused_unless_resume_or_overwrite(tiny_dict):
    tiny_dict["train"]["epochs"] = 1
    cfg = config_from_dict(tiny_dict)
    train(cfg, quiet=True)
    with pytest.raises(RunDirError, match=r"already holds a run.*--resume.*--overwrite"):
        train(cfg, quiet=True)
    train(cfg, overwrite=True, quiet=True)


def test_unwritable_run_directory(tiny_dict, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    tiny_dict["run"]["out_dir"] = str(blocker)
    with pytest.raises(RunDirError, match=r"cannot write to run directory"):
        train(config_from_dict(tiny_dict), quiet=True)


def test_resume_without_checkpoint(tiny_dict):
    with pytest.raises(CheckpointError, match=r"nothing to resume"):
        train(config_from_dict(tiny_dict), resume=True, quiet=True)


def test_lr_schedule_by_hand():
    cfg = TrainConfig(epochs=10, lr=0.1, milestones=[5, 8], gamma=0.1)
    assert lr_at(cfg, 0, 4) == pytest.approx(0.1)
    assert lr_at(cfg, 19, 4) == pytest.approx(0.1)  # last step of epoch 4 (0-based)
    assert lr_at(cfg, 20, 4) == pytest.approx(0.01)  # first step of epoch 5
    assert lr_at(cfg, 32, 4) == pytest.approx(0.001)
    frac = TrainConfig(epochs=10, lr=0.1, milestones=[0.5, 0.75])
    assert lr_at(frac, 20, 4) == pytest.approx(0.01)  # milestone 5.0
    assert lr_at(frac, 31, 4) == pytest.approx(0.01)  # epoch 7 < milestone 7.5
    assert lr_at(frac, 32, 4) == pytest.approx(0.001)  # milestone 7.5 -> epoch 8 (ceil)
    warm = TrainConfig(epochs=10, lr=0.1, warmup_epochs=1, schedule="constant")
    assert lr_at(warm, 0, 4) == pytest.approx(0.025)
    assert lr_at(warm, 3, 4) == pytest.approx(0.1)
    cos = TrainConfig(epochs=10, lr=0.1, schedule="cosine")
    assert lr_at(cos, 20, 4) == pytest.approx(0.05)
    assert lr_at(cos, 10, 4) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.25)))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/selfkd-pwned",))


def test_pickled_code_in_checkpoint_is_refused(tmp_path):
    marker = Path("/tmp/selfkd-pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    torch.save({"format": "selfkd-checkpoint-1", "model": _Evil()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()
    # a plain pickle file, not a torch zip archive
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_foreign_checkpoints(tmp_path):
    path = tmp_path / "ok.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(100)}})
    assert load_checkpoint(path)["model"]["w"].sum() == 100
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"corrupt or truncated"):
        load_checkpoint(path)
    torch.save({"w": torch.ones(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"not a selfkd checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


register_nan_method("_nan_after_two_steps", from_step=2)  # NaN from the third step


def test_nonfinite_loss_stops_with_step_and_terms(tiny_dict):
    tiny_dict["method"] = {"name": "_nan_after_two_steps"}
    with pytest.raises(TrainingError, match=r"non-finite loss .*global step 2.*terms: ce="):
        train(config_from_dict(tiny_dict), quiet=True)
    # the run is recorded as failed (reports list it, never drop it)
    run = Path(tiny_dict["run"]["out_dir"]) / "tiny"
    final = json.loads((run / "final.json").read_text())
    assert final["status"] == "failed" and "non-finite loss" in final["error"]
    from selfkd.report.table import report

    assert "| _nan_after_two_steps | 0 (+1 failed) |" in report([run])


def test_nonfinite_skip_mode_counts_steps(tiny_dict):
    tiny_dict["method"] = {"name": "_nan_after_two_steps"}
    tiny_dict["run"]["nonfinite"] = "skip"
    tiny_dict["run"]["max_skipped_steps"] = 1000
    tiny_dict["train"]["epochs"] = 1
    final = train(config_from_dict(tiny_dict), quiet=True)
    assert final["skipped_steps"] == 1  # 48 samples / 16 = 3 steps; only global step 2 is NaN


def test_a_run_directory_in_use_is_refused(tiny_dict):
    from selfkd.engine.rundir import RunDir

    cfg = config_from_dict(tiny_dict)
    other = RunDir(Path(cfg.run.out_dir) / cfg.run.name)
    other.acquire()  # another process (a second open file description) holds the run
    try:
        with pytest.raises(RunDirError, match="in use by another selfkd process"):
            train(cfg, quiet=True)
    finally:
        other.release()
    train(cfg, quiet=True)  # free again: trains
