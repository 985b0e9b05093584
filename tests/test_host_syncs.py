"""No host round-trips in a training step; the non-finite watch that replaces the per-step check.

A GPU step that reads a value back (``.item()``, ``bool(t)``, a boolean-mask index, ...) makes the
host wait for the device. :func:`selfkd.engine.hostsync.count_host_reads` counts such reads made
by selfkd code; here every method's real engine step (``Trainer.train_step``) must make none.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import TINY, register_nan_method
from selfkd.config import config_from_dict
from selfkd.engine import Trainer
from selfkd.engine.checkpoint import load_checkpoint, save_checkpoint
from selfkd.engine.guard import NonFiniteWatch
from selfkd.engine.hostsync import count_host_reads
from selfkd.engine.rundir import close_logger
from selfkd.engine.runner import train
from selfkd.errors import ConfigError, TrainingError
from selfkd.methods import METHODS, Method, StepOutput, build_method

# --- the counter itself --------------------------------------------------------------------


def test_count_host_reads_finds_reads_and_restores_tensor_methods() -> None:
    x = torch.tensor([1.0, -2.0, 3.0])
    item = torch.Tensor.item
    with count_host_reads() as reads:
        x.sum().item()
        if x.max() > 0:  # bool()
            pass
        float(x[0])
        _ = x[x > 0]  # boolean mask: the result size is data-dependent
        _ = x[torch.tensor([0, 2])]  # an index tensor: no read
        _ = (x * 2).softmax(0)  # device work only
    assert reads.count == 4, reads.sites
    kinds = sorted(site.rsplit(" ", 1)[1] for site in reads.sites)
    assert kinds == ["__bool__", "__float__", "__getitem__[mask]", "item"]
    assert all(site.startswith(__file__) for site in reads.sites)
    assert torch.Tensor.item is item  # restored
    with count_host_reads() as none:
        pass
    assert none.count == 0


def test_reads_inside_torch_are_not_counted() -> None:
    # Adam keeps its step counter on the host and reads it: torch's business, not a sync of ours
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    with count_host_reads() as reads:
        opt.step()
    assert reads.count == 0, reads.sites


# --- the non-finite watch ----------------------------------------------------------------


def test_watch_records_the_first_bad_step_and_its_terms() -> None:
    watch = NonFiniteWatch("cpu")
    one = torch.tensor(1.0)
    with count_host_reads() as reads:
        watch.observe(one, {"ce": one * 2}, 0)
        watch.observe(one, {"ce": one * 3, "kl": one}, 1)  # the terms may change
        flag = watch.flag()
        watch.observe(torch.tensor(5.0), {"ce": one, "kl": torch.tensor(float("inf"))}, 2)
        watch.observe(torch.tensor(float("nan")), {"ce": one * 7}, 3)  # later: not recorded
        watch.observe(one, {"ce": one * 8, "kl": one * 9}, 4)
    assert reads.count == 0  # observing never reads back
    assert not bool(flag)
    assert bool(watch.flag())
    first = watch.first()
    assert first is not None and first.global_step == 2
    assert first.values == {"loss": 5.0, "ce": 1.0, "kl": math.inf}
    assert NonFiniteWatch("cpu").first() is None


# --- every method's step -----------------------------------------------------------------


CUTMIX = {"name": "cutmix", "alpha": 1.0}
VARIANTS: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
    *((name, {"name": name}, None) for name in METHODS.names() if not name.startswith("_")),
    ("aikd-snapshot", {"name": "aikd", "prev_source": "snapshot"}, None),
    ("aikd-top2", {"name": "aikd", "bank_topk": 2}, None),
    ("aikd-cutmix", {"name": "aikd"}, CUTMIX),
    ("pskd-cutmix", {"name": "pskd"}, CUTMIX),
]


def _trainer(tmp_path: Path, name: str, spec: dict[str, Any], mix: Any, **run: Any) -> Trainer:
    cfg = copy.deepcopy(TINY)
    cfg["run"].update(name=name, out_dir=str(tmp_path / "runs"), **run)
    cfg["method"] = spec
    if mix is not None:
        cfg["data"]["mix"] = mix
    config = config_from_dict(cfg)
    method = build_method(config.method)
    param = method.teacher_param
    if param is not None and method.needs_teacher():
        teacher = tmp_path / "phase1.pt"
        if not teacher.exists():  # any CE checkpoint of the same model serves as phase 1
            phase1 = copy.deepcopy(cfg)
            phase1["run"]["name"] = f"{name}-phase1"
            phase1["method"] = {"name": "ce"}
            ce = Trainer(config_from_dict(phase1), quiet=True)
            save_checkpoint(teacher, ce.checkpoint_payload())
            close_logger(ce.log)
        setattr(method.params, param, str(teacher))
    return Trainer(config, method=method, quiet=True)


def _run_steps(trainer: Trainer, epoch: int, steps: int) -> None:
    trainer.method.on_epoch_start(trainer.forward_model, epoch)
    batches = list(trainer.data.train_loader.iterate(epoch))
    for step in range(steps):
        x, y, idx = batches[step % len(batches)]
        trainer.train_step(x, y, idx, epoch, step % len(batches))
        trainer.global_step += 1


@pytest.mark.parametrize("label,spec,mix", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_a_training_step_reads_nothing_back(
    tmp_path: Path, label: str, spec: dict[str, Any], mix: Any
) -> None:
    trainer = _trainer(tmp_path, label, spec, mix)
    try:
        trainer.model.train()
        trainer.method.train()
        _run_steps(trainer, 0, 1)  # first steps may build lazily (heads, one-hot bank rows)
        trainer.method.on_epoch_end(trainer.forward_model, 0)
        _run_steps(trainer, 1, 1)
        with count_host_reads() as reads:
            _run_steps(trainer, 1, 3)
        assert reads.count == 0, f"{label}: {dict(reads.sites)}"
        with count_host_reads() as check:  # the periodic check: one read, and the run is fine
            trainer._check()
        assert check.count == 1, dict(check.sites)
    finally:
        close_logger(trainer.log)


def test_skip_mode_reads_once_per_step(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "skip", {"name": "pskd"}, None, nonfinite="skip")
    try:
        _run_steps(trainer, 0, 1)
        with count_host_reads() as reads:
            _run_steps(trainer, 0, 3)
        assert reads.count == 3, dict(reads.sites)  # the skip decision needs the flag on the host
    finally:
        close_logger(trainer.log)


# --- deferred stop -----------------------------------------------------------------------


register_nan_method("_nan_from_step_four", from_step=4)  # epoch 2, step 2 at 3 steps/epoch


@METHODS.register("_nan_term")
class _NanTerm(Method):
    """Test-only: a finite loss but a NaN logged term (as a diverged AI-KD critic) at step 1."""

    name = "_nan_term"

    def training_step(self, model, batch, info):
        logits = model(batch.inputs)
        loss = torch.nn.functional.cross_entropy(logits, batch.targets)
        critic = torch.full((), float("nan") if info.global_step == 1 else 0.5)
        return StepOutput(
            loss=loss, logits=logits, targets=batch.targets, terms={"critic_loss": critic}
        )


def test_a_late_check_names_the_first_bad_step_and_keeps_the_last_good_checkpoint(
    tiny_dict: dict[str, Any],
) -> None:
    tiny_dict["method"] = {"name": "_nan_from_step_four"}
    tiny_dict["run"]["check_every"] = 100  # only the end-of-epoch check finds it
    with pytest.raises(TrainingError) as err:
        train(config_from_dict(tiny_dict), quiet=True)
    message = str(err.value)
    assert "non-finite loss nan at epoch 2, step 2 (global step 4); terms: ce=nan" in message
    assert "the last good checkpoint is" in message
    run = Path(tiny_dict["run"]["out_dir"]) / "tiny"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]  # epoch 2 was never written
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["progress"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_nonfinite_term_stops_the_run_naming_it(tiny_dict: dict[str, Any]) -> None:
    tiny_dict["method"] = {"name": "_nan_term"}
    tiny_dict["run"]["check_every"] = 2
    with pytest.raises(TrainingError, match=r"global step 1\); terms: critic_loss=nan"):
        train(config_from_dict(tiny_dict), quiet=True)


def test_check_every_must_be_positive(tiny_dict: dict[str, Any]) -> None:
    tiny_dict["run"]["check_every"] = 0
    with pytest.raises(ConfigError, match=r"run\.check_every must be at least 1"):
        config_from_dict(tiny_dict)
