"""Helpers shared by the test files.

Import them as ``from helpers import ...``: pytest's default ``rootdir``/``prepend`` import mode
puts ``tests/`` on ``sys.path`` (the test files are not a package).

Two groups:

* the tiny synthetic config ``TINY`` (behind the ``tiny_dict`` fixture of ``conftest.py``);
* run directories: :func:`read_rows`, :func:`metric_rows`, :func:`read_final` and
  :func:`assert_resume_is_exact` (train, crash, resume, compare) for end-to-end tests on the
  ``tiny_dict`` fixture of ``conftest.py``;
* a toy linear model on fixed inputs for method unit tests: ``N``, ``K``, ``LABELS``, ``X``,
  ``IDX``, :func:`tiny`, :func:`np_logits`, :func:`batch`, :func:`phase1_loader`,
  :func:`toy_ctx`, plus the numpy reference :func:`np_log_softmax`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from selfkd.config import config_from_dict
from selfkd.engine import Trainer, train
from selfkd.engine.checkpoint import load_checkpoint
from selfkd.engine.runner import resolve_teacher
from selfkd.methods.base import METHODS, Batch, Method, MethodContext, StepOutput, build_method

#: a tiny synthetic run that trains in a second or two on the CPU (3 steps per epoch)
TINY: dict[str, Any] = {
    "run": {"name": "tiny", "seed": 0, "device": "cpu", "deterministic": True, "progress": "off"},
    "data": {
        "name": "synthetic",
        "batch_size": 16,
        "eval_batch_size": 64,
        "options": {
            "num_classes": 4,
            "image_size": 12,
            "channels": 1,
            "train_per_class": 12,
            "test_per_class": 6,
        },
    },
    "model": {"name": "resnet8", "options": {"width": 4}},
    "train": {"epochs": 3, "lr": 0.05, "milestones": [0.5, 0.75]},
    "method": {"name": "ce"},
}


# --- run directories ----------------------------------------------------------------------------
def write_config(path: Path, data: dict) -> Path:
    """Write ``data`` as a YAML config file at ``path``."""
    path.write_text(yaml.safe_dump(data))
    return path


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's stderr, asserted to be one ``error: ...`` line without a traceback."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def is_time_column(key: str) -> bool:
    """Whether a metrics column holds a wall-clock time (``*seconds*`` or ``sec_per_iter``)."""
    return "seconds" in key or key == "sec_per_iter"


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl``, as written."""
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` without the timing columns (see
    :func:`is_time_column`): what two runs of the same setting must agree on exactly."""
    return [{k: v for k, v in row.items() if not is_time_column(k)} for row in read_rows(run_dir)]


def read_final(run_dir: Path) -> dict[str, Any]:
    """The final metrics a finished run wrote to ``run_dir/final.json``."""
    return json.loads((Path(run_dir) / "final.json").read_text())


class _Crash(Exception):
    """Raised by the callback of :func:`assert_resume_is_exact` to interrupt a run."""


def assert_resume_is_exact(tiny_dict: dict[str, Any], crash_after: int = 1) -> list[dict]:
    """Check that an interrupted and resumed run ends with the metrics of an uninterrupted one.

    Under ``tiny_dict["run"]["out_dir"]`` it trains run ``full``; then run ``crashed`` with the
    same setting, interrupted by a Trainer callback raising after ``crash_after`` epochs. The
    crash must really happen, leave no ``final.json`` and a last checkpoint at epoch
    ``crash_after``; ``selfkd.engine.train(cfg, resume=True, quiet=True)`` then finishes the run,
    whose rows (without timing columns) must equal those of ``full``. A phase-1 model the method
    needs (``aikd``, ``tfkd_self``) is resolved with ``resolve_teacher`` before the crashed
    Trainer is built, as ``train`` does. ``tiny_dict`` itself is left unchanged.

    Returns the rows of ``full`` (:func:`metric_rows`) for the caller's own checks.
    """
    out = Path(tiny_dict["run"]["out_dir"])
    data = copy.deepcopy(tiny_dict)
    assert 0 < crash_after < data["train"]["epochs"], "the crash must come before the last epoch"
    data["run"]["name"] = "full"
    train(config_from_dict(data), quiet=True)
    full = metric_rows(out / "full")

    data["run"]["name"] = "crashed"
    cfg = config_from_dict(data)
    method = build_method(cfg.method)
    resolve_teacher(cfg, method, quiet=True, log=lambda *_: None)

    def crash(trainer: Trainer, epoch: int) -> None:
        if epoch == crash_after:
            raise _Crash

    with pytest.raises(_Crash):
        Trainer(cfg, method=method, quiet=True, callbacks=[crash]).fit()
    run = out / "crashed"
    assert not (run / "final.json").exists()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["progress"]["epoch"] == crash_after
    train(cfg, resume=True, quiet=True)
    assert metric_rows(run) == full
    return full


# --- a toy linear model on fixed inputs --------------------------------------------------------
N, K = 8, 5
LABELS = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
X = torch.randn(N, 3, 4, generator=torch.Generator().manual_seed(0))
IDX = torch.tensor([0, 3, 5, 6])


def tiny(seed: int, k: int = K) -> nn.Module:
    """Flatten + Linear(12, k) with weights drawn from ``seed``: input ``X[idx]``."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, k))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model[1].weight.copy_(0.5 * torch.randn(k, 12, generator=gen))
        model[1].bias.copy_(0.1 * torch.randn(k, generator=gen))
    return model


def np_logits(model: nn.Module, idx: torch.Tensor) -> np.ndarray:
    """The logits of a :func:`tiny` model on ``X[idx]``, computed in float64 numpy."""
    w = model[1].weight.detach().double().numpy()
    b = model[1].bias.detach().double().numpy()
    return X[idx].reshape(len(idx), 12).double().numpy() @ w.T + b


def batch(idx) -> Batch:
    """The batch of samples ``idx`` of ``X``/``LABELS`` (no augmentation)."""
    idx = torch.as_tensor(idx)
    return Batch(inputs=X[idx], targets=LABELS[idx], indices=idx, raw=X[idx], augment=lambda t: t)


def phase1_loader(
    loaded: list[nn.Module], k: int = K, *, allowed: bool = True
) -> Callable[[str], nn.Module]:
    """A ``load_model`` for :func:`toy_ctx`: checks the path is ``phase1.pt`` and returns a new
    ``tiny(1, k)``, appended to ``loaded``; with ``allowed=False`` any call fails the test."""

    def load_model(path: str) -> nn.Module:
        if not allowed:
            raise AssertionError("load_model must not be called")
        assert path == "phase1.pt"
        loaded.append(tiny(1, k))
        return loaded[-1]

    return load_model


def toy_ctx(load_model: Callable[[str], nn.Module], *, epochs: int = 2) -> MethodContext:
    """A CPU MethodContext for the toy data: 2 steps an epoch, ``build_model`` gives tiny(99)."""
    return MethodContext(
        num_classes=K,
        num_train=N,
        train_labels=LABELS,
        epochs=epochs,
        steps_per_epoch=2,
        device=torch.device("cpu"),
        build_model=lambda: tiny(99),
        load_model=load_model,
    )


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over axis 1, as an independent numpy reference."""
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def register_nan_method(name: str, from_step: int) -> type[Method]:
    """Register a test-only method: cross-entropy (logged as ``ce``) that turns NaN from global
    step ``from_step`` on."""

    class NanFrom(Method):
        def training_step(self, model, batch, info):
            logits = model(batch.inputs)
            loss = torch.nn.functional.cross_entropy(logits, batch.targets)
            if info.global_step >= from_step:
                loss = loss * float("nan")
            return StepOutput(loss=loss, logits=logits, targets=batch.targets, terms={"ce": loss})

    NanFrom.name = name
    return METHODS.register(name)(NanFrom)
