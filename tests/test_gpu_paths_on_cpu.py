"""The speed flags meant for GPUs, exercised on the CPU: bf16 autocast, channels-last, compile.

No GPU is needed: PyTorch runs bf16 autocast, channels-last tensors and ``torch.compile``
(inductor, C++ backend) on the CPU, so the code paths the flags switch on are tested here.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from selfkd.config import config_from_dict
from selfkd.engine import Trainer
from selfkd.engine.checkpoint import save_checkpoint
from selfkd.engine.rundir import close_logger
from selfkd.engine.runner import train
from selfkd.methods import METHODS, build_method

METHOD_NAMES = [name for name in METHODS.names() if not name.startswith("_")]


def _config(tiny: dict[str, Any], name: str, method: str, **run: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(tiny)
    cfg["run"].update(name=name, **run)
    cfg["train"]["epochs"] = 2
    cfg["method"] = {"name": method}
    return cfg


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_bf16_autocast_trains_every_method(tiny_dict: dict[str, Any], method: str) -> None:
    final = train(config_from_dict(_config(tiny_dict, method, method, amp="bf16")), quiet=True)
    assert final["status"] == "finished"
    assert math.isfinite(final["test_nll"]) and math.isfinite(final["test_ece"])


def test_bf16_step_precisions(tiny_dict: dict[str, Any], tmp_path: Path) -> None:
    """Under bf16 autocast the student's logits are bf16, the loss float32, the AI-KD critic
    and its loss float32, and the bank keeps its own dtype."""
    cfg = config_from_dict(_config(tiny_dict, "aikd-bf16", "aikd", amp="bf16"))
    phase1 = config_from_dict(_config(tiny_dict, "phase1", "ce"))
    ce = Trainer(phase1, quiet=True)
    save_checkpoint(tmp_path / "phase1.pt", ce.checkpoint_payload())
    close_logger(ce.log)
    method = build_method(cfg.method)
    method.params.superior = str(tmp_path / "phase1.pt")
    trainer = Trainer(cfg, method=method, quiet=True)
    try:
        x, y, idx = next(iter(trainer.data.train_loader.iterate(0)))
        out, loss, _ = trainer.train_step(x, y, idx, 0, 0)
        assert out.logits.dtype == torch.bfloat16
        assert loss.dtype == torch.float32
        assert out.terms["critic_loss"].dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in method.critic.parameters())
        assert method.bank.table.dtype == torch.float16
    finally:
        close_logger(trainer.log)


@pytest.mark.parametrize("method", ["ce", "pskd", "dlb", "drg_dsr"])
def test_channels_last_gives_the_same_run(tiny_dict: dict[str, Any], method: str) -> None:
    plain = train(config_from_dict(_config(tiny_dict, "plain", method)), quiet=True)
    cl = train(config_from_dict(_config(tiny_dict, "cl", method, channels_last=True)), quiet=True)
    assert cl["test_top1_err"] == plain["test_top1_err"]
    assert cl["test_nll"] == pytest.approx(plain["test_nll"], abs=1e-5)


@pytest.mark.slow
def test_compile_keeps_feature_taps_across_runs_in_one_process(tiny_dict: dict[str, Any]) -> None:
    """A compiled CE run first fills dynamo's code cache for the model class; a compiled DRG+DSR
    run after it in the same process (a sweep, a phase 1 before phase 2) must still run the
    forward hooks its feature taps rely on, and match the uncompiled run."""
    finals = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("ce", "drg_dsr"):
            for compiled in (False, True):
                cfg = _config(tiny_dict, f"{method}-{compiled}", method, compile=compiled)
                finals[method, compiled] = train(config_from_dict(cfg), quiet=True)
    for method in ("ce", "drg_dsr"):
        plain, compiled = finals[method, False], finals[method, True]
        assert compiled["test_top1_err"] == plain["test_top1_err"]
        assert compiled["test_nll"] == pytest.approx(plain["test_nll"], abs=1e-5)
