"""A run's data and model built from its config (shared by the trainer and ``selfkd eval``)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from selfkd.config import Config
from selfkd.engine import checkpoint as ckpt
from selfkd.errors import CheckpointError, ConfigError


def build_data(
    cfg: Config, *, batch_size: int | None = None, rank: int = 0, world_size: int = 1
) -> Any:
    """The :class:`~selfkd.data.DataBundle` of ``cfg.data`` (``batch_size``: per process)."""
    from selfkd.data import build_data_from_config

    if batch_size is None:  # one process: the loaders' own default
        return build_data_from_config(cfg.data, cfg.run.seed)
    return build_data_from_config(
        cfg.data, cfg.run.seed, batch_size=batch_size, rank=rank, world_size=world_size
    )


def check_data(data: Any, cfg: Config, world_size: int) -> None:
    """Refuse data this run cannot train on: a train loader sharded for another number of
    processes, or fewer than 5 classes for ``run.best_metric: top5_err``."""
    loader_world = getattr(data.train_loader, "world_size", 1)
    if loader_world != world_size:
        raise ConfigError(
            f"the data's train loader is sharded for {loader_world} process(es) but this run "
            f"has {world_size}; build it with build_data(rank=, world_size=)"
        )
    if cfg.run.best_metric == "top5_err" and data.num_classes < 5:
        raise ConfigError(
            f"run.best_metric top5_err needs at least 5 classes, the data has "
            f"{data.num_classes}; choose top1_err"
        )


def steps_per_epoch(data: Any, cfg: Config) -> int:
    """Optimizer steps in one epoch of ``data`` (batches of the train loader, drop_last)."""
    steps = len(data.train_loader)
    if steps == 0:
        raise ConfigError(
            f"the training split has {data.num_train} samples, fewer than one batch of "
            f"{cfg.data.batch_size} with drop_last; lower data.batch_size"
        )
    return steps


def build_model(cfg: Config, data: Any) -> nn.Module:
    """A new model of ``cfg.model`` sized for ``data`` (its classes and input channels)."""
    from selfkd.models import build_model as from_registry

    return from_registry(
        cfg.model.name,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        **cfg.model.options,
    )


def input_shape(data: Any) -> tuple[int, int, int]:
    """``(channels, height, width)`` of one input image of ``data``."""
    size = data.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (int(data.in_channels), int(height), int(width))


def fresh_model(
    cfg: Config, data: Any, device: torch.device, given: nn.Module | None = None
) -> nn.Module:
    """A new, untrained model of the run's architecture on ``device``: a re-initialised copy of
    ``given`` (a model passed through the Python API) or one built from the config."""
    if given is not None:
        model = copy.deepcopy(given)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    else:
        model = build_model(cfg, data)
    return model.to(device)


def load_compatible(
    path: str,
    *,
    fresh: Callable[[], nn.Module],
    dataset: str,
    num_classes: int,
    model_config: dict[str, Any] | None,
    device: torch.device,
) -> nn.Module:
    """A trained model of this run's architecture (e.g. AI-KD's superior) from checkpoint
    ``path``, after checking that it was trained on ``dataset`` and fits ``fresh()``."""
    data = ckpt.load_checkpoint(path, map_location=device)
    meta = data.get("meta", {})
    trained_on = meta.get("dataset")
    if trained_on is not None and trained_on != dataset:
        raise CheckpointError(
            f"{path} was trained on dataset {trained_on!r}, this run uses "
            f"{dataset!r}; train the superior model on the same data"
        )
    model = fresh()
    ckpt.check_compatible(meta, model, num_classes, f"checkpoint {path}", model_config)
    model.load_state_dict(data["model"])
    return model


def resolve_config(
    cfg: Config, method: Any, data: Any, mixer: Any, mix_split: bool
) -> dict[str, Any]:
    """The config with every default filled in (the method's parameters, the data's
    normalisation and augmentation, data.mix as applied); still a valid config file."""
    resolved = cfg.to_dict()
    resolved["method"] = method.describe()
    info = getattr(data, "resolved", None) or {}
    if "mean" in info and "std" in info and resolved["data"].get("normalize") is None:
        resolved["data"]["normalize"] = {"mean": list(info["mean"]), "std": list(info["std"])}
    for key in ("crop_padding", "hflip"):
        if key in info and key not in resolved["data"]["augment"]:
            resolved["data"]["augment"][key] = info[key]
    if mixer is not None:
        resolved["data"]["mix"] = mixer.describe(split=mix_split)
    return resolved


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
