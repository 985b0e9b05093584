"""Evaluate a finished (or interrupted) run from its directory: ``selfkd eval RUN_DIR``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfkd import metrics as M
from selfkd.config import Config, load_config
from selfkd.engine import checkpoint as ckpt
from selfkd.engine.device import amp_dtype, resolve_device
from selfkd.engine.rundir import CONFIG
from selfkd.engine.trainer import collect_logits
from selfkd.errors import RunDirError


@dataclass
class LoadedRun:
    """A run rebuilt from its directory: config, data, model with a checkpoint's weights."""

    cfg: Config
    data: Any  # selfkd.data.DataBundle
    model: nn.Module
    device: torch.device
    dtype: torch.dtype | None
    state: dict[str, Any]


def build_model_from_checkpoint(
    cfg: Config, data: Any, path: str | Path, device: torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh model of ``cfg`` on ``device`` with the weights of checkpoint ``path``."""
    from selfkd.models import build_model

    model = build_model(
        cfg.model.name,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        **cfg.model.options,
    ).to(device)
    state = ckpt.load_checkpoint(path, map_location=device)
    ckpt.check_compatible(state.get("meta", {}), model, data.num_classes, f"checkpoint {path}")
    model.load_state_dict(state["model"])
    return model, state


def load_run(run_dir: str | Path, which: str = "last", device: str = "auto") -> LoadedRun:
    """Rebuild data and model from RUN/config.yaml and load RUN/checkpoints/<which>.pt."""
    from selfkd.data import build_data_from_config

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise RunDirError(
            f"{run_dir} is not a run directory (no {CONFIG}); "
            "pass the folder a `selfkd train` run wrote"
        )
    cfg = load_config(run_dir / CONFIG)
    dev = resolve_device(device)
    data = build_data_from_config(cfg.data, cfg.run.seed)
    path = run_dir / "checkpoints" / f"{which}.pt"
    model, state = build_model_from_checkpoint(cfg, data, path, dev)
    return LoadedRun(cfg, data, model, dev, amp_dtype(cfg.run.amp, dev), state)


def evaluate_run(run_dir: str | Path, which: str = "last", device: str = "auto") -> dict[str, Any]:
    """Rebuild data and model from RUN/config.yaml, load a checkpoint, return test metrics."""
    run = load_run(run_dir, which, device)
    model, data, dev, dtype = run.model, run.data, run.device, run.dtype
    temperature = None
    if data.val_loader is not None:
        vlogits, vtargets = collect_logits(model, data.val_loader, data.transform, dev, dtype)
        temperature = M.fit_temperature(vlogits, vtargets)
    logits, targets = collect_logits(model, data.test_loader, data.transform, dev, dtype)
    result = M.evaluate_logits(logits, targets, temperature=temperature)
    result["epoch"] = run.state.get("progress", {}).get("epoch")
    return result
