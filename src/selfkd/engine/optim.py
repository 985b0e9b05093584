"""Optimizer and learning-rate schedule.

The learning rate is a pure function of the global step, so resuming needs no scheduler state:
linear warm-up over ``warmup_epochs`` (per iteration), then ``multistep`` (×gamma at each
milestone; milestones below 1 are fractions of the run, e.g. [0.5, 0.75]), ``cosine`` (to 0 at
the end) or ``constant``. Milestones are applied at the start of the epoch they name, as in the
PS-KD official code (epochs counted from 0: milestone 150 means epochs 150.. use lr×0.1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from selfkd.config import TrainConfig
from selfkd.errors import ConfigError


def milestone_epochs(cfg: TrainConfig) -> list[float]:
    if cfg.milestones and all(m < 1 for m in cfg.milestones):
        return [m * cfg.epochs for m in cfg.milestones]
    return list(cfg.milestones)


def lr_at(cfg: TrainConfig, global_step: int, steps_per_epoch: int) -> float:
    """Learning rate for the step with 0-based index ``global_step``."""
    steps_per_epoch = max(1, steps_per_epoch)
    epoch_float = global_step / steps_per_epoch
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if warmup_steps > 0 and global_step < warmup_steps:
        return cfg.lr * (global_step + 1) / warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "multistep":
        epoch = global_step // steps_per_epoch
        passed = sum(1 for m in milestone_epochs(cfg) if epoch >= math.ceil(m - 1e-9))
        return cfg.lr * cfg.gamma**passed
    if cfg.schedule == "cosine":
        start = cfg.warmup_epochs
        span = max(1e-9, cfg.epochs - start)
        progress = min(1.0, max(0.0, (epoch_float - start) / span))
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))
    raise ConfigError(f"train.schedule {cfg.schedule!r} is not multistep, cosine or constant")


def parameter_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """All trainable parameters, weight decay on every one of them (as the papers' code does)."""
    params: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return [{"params": params, "weight_decay": weight_decay}]


def build_optimizer(modules: Iterable[nn.Module], cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(modules, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ConfigError(f"train.optimizer {cfg.optimizer!r} is not sgd or adamw")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
