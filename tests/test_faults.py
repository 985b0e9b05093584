"""Faults: signals, SIGKILL at random moments, failed checkpoint writes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import metric_rows
from selfkd.config import config_from_dict
from selfkd.engine import Trainer, train
from selfkd.engine import checkpoint as ckpt
from selfkd.engine.checkpoint import load_checkpoint
from selfkd.engine.runner import resolve_teacher
from selfkd.errors import CheckpointError, RunInterrupted
from selfkd.methods import build_method

SIGTERM_AT = 4  # global step; the tiny config has 3 steps per epoch


@pytest.mark.parametrize("method", ["ce", "pskd", "aikd"])
def test_sigterm_mid_epoch_then_resume_is_exact(tiny_dict, method, monkeypatch):
    tiny_dict["method"] = {"name": method}
    tiny_dict["run"]["name"] = "full"
    train(config_from_dict(tiny_dict), quiet=True)
    full = metric_rows(Path(tiny_dict["run"]["out_dir"]) / "full")

    # the same run, sending itself SIGTERM during global step 4 (epoch 2, second step)
    tiny_dict["run"]["name"] = "stopped"
    cfg = config_from_dict(tiny_dict)
    stopped_method = build_method(cfg.method)
    resolve_teacher(cfg, stopped_method, quiet=True, log=lambda *_: None)
    original = type(stopped_method).training_step
    fired = []

    def training_step(self, model, batch, info):
        if info.global_step == SIGTERM_AT and not fired:
            fired.append(info.global_step)
            signal.raise_signal(signal.SIGTERM)
        return original(self, model, batch, info)

    monkeypatch.setattr(type(stopped_method), "training_step", training_step)
    with pytest.raises(RunInterrupted, match=r"SIGTERM at epoch 2, step 2/3.*--resume") as info:
        Trainer(cfg, method=stopped_method, quiet=True).fit()
    assert info.value.exit_code == 128 + signal.SIGTERM
    run = Path(cfg.run.out_dir) / "stopped"
    progress = load_checkpoint(run / "checkpoints" / "last.pt")["progress"]
    assert (progress["epoch"], progress["step_in_epoch"], progress["global_step"]) == (1, 2, 5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.undo()
    train(cfg, resume=True, quiet=True)
    assert metric_rows(run) == full


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, {"model": {"w": torch.zeros(3)}})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", full_disk)
    with pytest.raises(CheckpointError, match=r"No space left on device.*previous checkpoint"):
        ckpt.save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def _run_cli(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "selfkd", "train", "-c", str(config), "-q", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ce", "pskd", "aikd"])
def test_sigkill_at_random_moments_then_resume_is_exact(tiny_dict, tmp_path, method):
    """SIGKILL three times, each at a different delay after an epoch's metrics row appears
    (around the checkpoint write), then resume to the end: the metrics equal an uninterrupted
    run's. (AI-KD trains and reuses its phase-1 model; kills land in the student run.) Twelve
    epochs: on a fast CPU a tiny epoch takes milliseconds, and with six a resumed run could end
    inside one poll-and-sleep window before its third kill."""
    tiny_dict["train"]["epochs"] = 12
    tiny_dict["method"] = {"name": method}
    tiny_dict["run"]["threads"] = 1
    tiny_dict["run"]["name"] = "full"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict))
    assert _run_cli(config).wait(timeout=300) == 0
    full = metric_rows(Path(tiny_dict["run"]["out_dir"]) / "full")

    tiny_dict["run"]["name"] = "killed"
    config.write_text(yaml.safe_dump(tiny_dict))
    run = Path(tiny_dict["run"]["out_dir"]) / "killed"
    kills = 0
    for attempt in range(40):
        args = ["--resume"] if (run / "checkpoints" / "last.pt").exists() else ["--overwrite"]
        proc = _run_cli(config, *args)
        if kills < 3:
            # let it get past start-up, then kill it wherever it is (maybe mid-checkpoint)
            deadline = time.time() + 120
            start_epochs = len(metric_rows(run)) if (run / "metrics.jsonl").exists() else 0
            while time.time() < deadline and proc.poll() is None:
                rows = len(metric_rows(run)) if (run / "metrics.jsonl").exists() else 0
                if rows > start_epochs:
                    time.sleep(0.05 * (attempt % 4))
                    break
                time.sleep(0.02)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=60)
            continue
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
        break
    assert kills == 3
    assert json.loads((run / "final.json").read_text())["status"] == "finished"
    assert metric_rows(run) == full


def test_corrupt_last_checkpoint_falls_back_to_previous(tiny_dict):
    tiny_dict["run"]["name"] = "full"
    train(config_from_dict(tiny_dict), quiet=True)
    full = metric_rows(Path(tiny_dict["run"]["out_dir"]) / "full")

    tiny_dict["run"]["name"] = "corrupt"
    cfg = config_from_dict(tiny_dict)

    def stop_after_two(trainer, epoch):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, quiet=True, callbacks=[stop_after_two]).fit()
    ckpts = Path(cfg.run.out_dir) / "corrupt" / "checkpoints"
    assert load_checkpoint(ckpts / "last.prev.pt")["progress"]["epoch"] == 1
    data = (ckpts / "last.pt").read_bytes()
    (ckpts / "last.pt").write_bytes(data[: len(data) // 3])  # truncated, e.g. by a bad disk
    with pytest.warns(UserWarning, match=r"corrupt or truncated.*using the previous checkpoint"):
        train(cfg, resume=True, quiet=True)
    # epoch 2 was trained again from the epoch-1 checkpoint: the same metrics as uninterrupted
    assert metric_rows(Path(cfg.run.out_dir) / "corrupt") == full
