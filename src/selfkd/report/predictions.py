"""Predictions of a trained run, for figures: test logits and penultimate features, val logits.

:func:`collect_predictions` rebuilds a run's data and model exactly as ``selfkd eval`` does
(:func:`selfkd.engine.evaluate.load_run`), then runs the checkpoint in eval mode over the test
split, recording the logits and the ``pooled`` feature tap (the input of the final classifier),
and over the held-out validation split when the run has one; the temperature is fitted on that
validation split (never on the test split). With ``superior=True`` it also runs the model the
run learned from (AI-KD's ``method.superior``, TF-KD's ``method.teacher``) on the same test
split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfkd import metrics as M
from selfkd.engine.device import autocast
from selfkd.errors import CheckpointError, RunDirError

__all__ = [
    "TEACHER_KEYS",
    "Predictions",
    "collect_features",
    "collect_predictions",
    "teacher_checkpoint",
]

#: Method parameters that name the checkpoint of the model a run learned from.
TEACHER_KEYS = ("superior", "teacher")


@dataclass
class Predictions:
    """What one model predicts on a run's test (and validation) split.

    ``test_logits`` (N×K float32), ``test_targets`` (N int64) and ``test_features`` (N×D
    float32 penultimate features) are on the CPU, in test-set order. ``val_logits`` /
    ``val_targets`` are None when the run has no validation split, and so is ``temperature``
    (fitted with :func:`selfkd.metrics.fit_temperature` on the validation logits).
    ``superior`` holds the predictions of the model the run learned from, when collected.
    """

    run_dir: Path
    config: dict[str, Any]
    test_logits: Tensor
    test_targets: Tensor
    test_features: Tensor
    val_logits: Tensor | None = None
    val_targets: Tensor | None = None
    temperature: float | None = None
    class_names: list[str] = field(default_factory=list)
    epoch: int | None = None
    superior: Predictions | None = None
    superior_key: str | None = None

    @property
    def num_classes(self) -> int:
        return int(self.test_logits.shape[1])


@torch.no_grad()
def collect_features(
    model: nn.Module,
    loader: Any,
    transform: Any,
    device: torch.device,
    dtype: torch.dtype | None = None,
    tap: str = "pooled",
) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``model`` in eval mode over ``loader``: CPU float32 logits, targets, ``tap`` features.

    Features are flattened to one vector per sample.
    """
    from selfkd.models.taps import FeatureTaps

    was_training = model.training
    model.eval()
    outs, targets, feats = [], [], []
    with FeatureTaps(model, [tap], detach=True) as taps:
        for x, y, _ in loader.iterate(0):
            x = transform.eval(x.to(device, non_blocking=True))
            with autocast(device, dtype):
                logits = model(x)
            outs.append(logits.float().cpu())
            feats.append(taps[tap].float().flatten(1).cpu())
            targets.append(y.cpu())
    model.train(was_training)
    return torch.cat(outs), torch.cat(targets), torch.cat(feats)


def _predict(run: Any, model: nn.Module, run_dir: Path, validation: bool = True) -> Predictions:
    from selfkd.engine.evaluate import collect_logits

    data = run.data
    logits, targets, features = collect_features(
        model, data.test_loader, data.transform, run.device, run.dtype
    )
    vlogits = vtargets = temperature = None
    if validation and data.val_loader is not None:
        vlogits, vtargets = collect_logits(
            model, data.val_loader, data.transform, run.device, run.dtype
        )
        temperature = M.fit_temperature(vlogits, vtargets)
    return Predictions(
        run_dir=run_dir,
        config=run.cfg.to_dict(),
        test_logits=logits,
        test_targets=targets,
        test_features=features,
        val_logits=vlogits,
        val_targets=vtargets,
        temperature=temperature,
        class_names=list(getattr(data, "class_names", []) or []),
    )


def _check_checkpoint(run_dir: Path, which: str) -> None:
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(
            f"{run_dir} is not a run directory (no config.yaml); "
            "pass the folder a `selfkd train` run wrote"
        )
    path = run_dir / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        raise CheckpointError(
            f"run {run_dir} has no checkpoint {path.relative_to(run_dir)}; "
            "train (or resume) it first, or plot only its curves with --kind curves"
        )


def teacher_checkpoint(config: dict[str, Any]) -> tuple[str, Path] | None:
    """``(parameter name, checkpoint path)`` of the model a run learned from, or None."""
    method = config.get("method") or {}
    for key in TEACHER_KEYS:
        value = method.get(key)
        if isinstance(value, str) and value.strip() and value != "auto":
            return key, Path(value)
    return None


def _superior(run: Any, run_dir: Path) -> tuple[str, Predictions] | None:
    from selfkd.engine.evaluate import build_model_from_checkpoint

    found = teacher_checkpoint(run.cfg.to_dict())
    if found is None:
        return None
    key, path = found
    if not path.is_file():
        raise CheckpointError(
            f"the {key} model of run {run_dir} is not at {path} (method.{key} in its "
            "config.yaml); restore that file or edit the path"
        )
    model, state = build_model_from_checkpoint(run.cfg, run.data, path, run.device)
    dataset = state.get("meta", {}).get("dataset")
    if dataset is not None and dataset != run.cfg.data.name:
        raise CheckpointError(
            f"{path} was trained on dataset {dataset!r}, but run {run_dir} uses "
            f"{run.cfg.data.name!r}"
        )
    pred = _predict(run, model, path.parent.parent, validation=False)
    pred.epoch = state.get("progress", {}).get("epoch")
    return key, pred


def collect_predictions(
    run_dir: str | Path, which: str = "last", device: str = "auto", superior: bool = False
) -> Predictions:
    """Test logits, targets and penultimate features (+ val logits and T) of a run's checkpoint.

    With ``superior=True`` and a run whose resolved config names the model it learned from
    (``method.superior`` / ``method.teacher``), that model's test predictions are collected too
    (``.superior``, ``.superior_key``); a named checkpoint that is missing raises
    CheckpointError. The run's data is built once for both models.
    """
    from selfkd.engine.evaluate import load_run

    run_dir = Path(run_dir)
    _check_checkpoint(run_dir, which)
    run = load_run(run_dir, which, device)
    pred = _predict(run, run.model, run_dir)
    pred.epoch = run.state.get("progress", {}).get("epoch")
    if superior:
        found = _superior(run, run_dir)
        if found is not None:
            pred.superior_key, pred.superior = found
    return pred
