"""A trained model without its dataset: :func:`load_model` and ``selfkd export``.

A checkpoint records everything needed to rebuild its model: the resolved config (model name
and options), the class count and input channels, and a fingerprint of the architecture. So
``selfkd.load_model(RUN)`` builds the model and loads the weights without reading any data
(``torch.load(weights_only=True)``: nothing in the file can run code).

``selfkd export RUN --format safetensors`` writes ``RUN/export/model.safetensors`` (the
weights, with the config and model facts in the file's metadata) and ``RUN/export/config.yaml``
(the config the weights were trained with, plus a ``meta`` section). :func:`load_model` reads an
export back as well.

Inputs to the model are normalized as in the config's ``data.normalize`` (mean and std per
channel); the model returns logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfkd.config import dump_yaml
from selfkd.engine import checkpoint as ckpt
from selfkd.errors import CheckpointError, ConfigError, RunDirError

EXPORT_FORMAT = "selfkd-export-1"
FORMATS = ("safetensors",)
WEIGHTS = "model.safetensors"


def find_checkpoint(path: str | Path, which: str = "last") -> Path:
    """The checkpoint file of a run directory (``checkpoints/<which>.pt``) or ``path`` itself
    when it is a file; RunDirError (one line) when it is neither."""
    path = Path(path)
    if path.is_file():
        return path
    found = path / "checkpoints" / f"{which}.pt"
    if path.is_dir() and found.is_file():
        return found
    if path.is_dir() and (path / WEIGHTS).is_file():
        return path / WEIGHTS
    raise RunDirError(
        f"{path} is not a run directory or a checkpoint (no checkpoints/{which}.pt in it); "
        "pass the folder a `selfkd train` run wrote, one of its .pt files or an export folder"
    )


def _model_facts(meta: dict[str, Any], where: Path) -> tuple[str, dict[str, Any], int, int]:
    """(model name, options, num_classes, in_channels) recorded in a checkpoint's meta."""
    config = meta.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or "num_classes" not in meta or "in_channels" not in meta:
        raise CheckpointError(
            f"{where} does not record its model (config, num_classes, in_channels); "
            "it was not written by the selfkd trainer"
        )
    name, options = str(model.get("name")), dict(model.get("options") or {})
    if meta.get("model") not in (None, name):
        raise CheckpointError(
            f"{where} holds a model given through the Python API ({meta.get('model')}), which "
            "selfkd cannot rebuild; build it yourself and load torch.load(path, "
            "weights_only=True)['model'] into it"
        )
    if options.get("pretrained"):
        options["pretrained"] = False  # the trained weights replace any pretrained ones
    return name, options, int(meta["num_classes"]), int(meta["in_channels"])


def _build(meta: dict[str, Any], where: Path) -> nn.Module:
    from selfkd.models import build_model

    name, options, num_classes, in_channels = _model_facts(meta, where)
    try:
        return build_model(name, num_classes=num_classes, in_channels=in_channels, **options)
    except ConfigError as exc:
        raise CheckpointError(f"cannot rebuild the model of {where}: {exc}") from None


def load_model(
    path: str | Path, which: str = "last", device: str | torch.device = "cpu"
) -> nn.Module:
    """The trained model of a run directory, a checkpoint (``.pt``) or an export (folder or
    ``.safetensors``), in eval mode on ``device``. No dataset is read.

    ``which`` picks ``checkpoints/last.pt`` or ``best.pt`` of a run directory.
    """
    file = find_checkpoint(path, which)
    if file.suffix == ".safetensors":
        meta, weights = _read_export(file)
    else:
        state = ckpt.load_checkpoint(file, map_location="cpu")
        meta, weights = state.get("meta", {}), state["model"]
    model = _build(meta, file)
    ckpt.check_compatible(meta, model, int(meta["num_classes"]), f"checkpoint {file}")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(f"{file} does not fit its model ({first})") from None
    return model.to(device).eval()


def _read_export(file: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    safetensors = _safetensors()
    try:
        with safetensors.safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
        weights = safetensors.torch.load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from None
    if header.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{file} is not a selfkd export (no '{EXPORT_FORMAT}' marker)")
    return json.loads(header["meta"]), weights


def _safetensors() -> Any:
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise ConfigError("export needs safetensors; pip install 'selfkd[export]'") from None
    return safetensors


def export_run(
    path: str | Path,
    fmt: str = "safetensors",
    which: str = "last",
    out: str | Path | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the weights of a run's checkpoint (``model.safetensors``) and its config
    (``config.yaml``) into ``out`` (default ``RUN/export``); return the files written."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    safetensors = _safetensors()
    file = find_checkpoint(path, which)
    if file.suffix != ".pt":
        raise CheckpointError(f"{file} is already an export; pass a run directory or a .pt file")
    state = ckpt.load_checkpoint(file, map_location="cpu")
    meta = dict(state.get("meta", {}))
    _build(meta, file)  # refuses what cannot be loaded back
    run_dir = file.parent.parent if file.parent.name == "checkpoints" else file.parent
    folder = Path(out) if out is not None else run_dir / "export"
    targets = [folder / WEIGHTS, folder / "config.yaml"]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise RunDirError(
            f"{existing[0]} already exists; pass --overwrite to replace it or --out another folder"
        )
    progress = state.get("progress", {})
    meta["checkpoint"] = {"file": file.name, "epoch": progress.get("epoch")}
    # a fresh, contiguous copy of each tensor: safetensors refuses shared or strided storage
    weights = {k: v.detach().cpu().clone().contiguous() for k, v in state["model"].items()}
    header = {"format": EXPORT_FORMAT, "meta": json.dumps(meta, default=str)}
    config = dict(meta.get("config") or {})
    config["meta"] = {k: v for k, v in meta.items() if k != "config"}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_bytes(targets[0], safetensors.torch.save(weights, metadata=header))
        ckpt.atomic_write_text(targets[1], dump_yaml(config))
    except OSError as exc:
        raise RunDirError(
            f"could not write the export to {folder} ({exc.strerror or exc})"
        ) from None
    return targets
