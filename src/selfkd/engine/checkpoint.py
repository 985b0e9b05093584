"""Checkpoints: atomic writes, safe loads (``weights_only=True``), and compatibility checks.

A checkpoint is a dict of tensors and plain Python values only, so ``torch.load`` never has to
unpickle code. It records the selfkd/torch/torchvision versions, the run's config and a
fingerprint of the model definition (class name plus every parameter's name and shape); loading
into a model with another fingerprint is refused with a message saying what differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfkd.errors import CheckpointError

FORMAT = "selfkd-checkpoint-1"


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model class and the names and shapes of its parameters and buffers."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
    return digest.hexdigest()[:16]


def versions() -> dict[str, str]:
    import torchvision

    import selfkd

    return {
        "selfkd": str(selfkd.__version__),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
    }


def atomic_write_bytes(path: Path, data: bytes, keep_previous: Path | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    With ``keep_previous``, the file being replaced is first renamed to that path, so the
    previous version survives a later corruption of ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; use the usual file mode
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(path: Path, payload: dict[str, Any], keep_previous: Path | None = None) -> None:
    """Serialize ``payload`` with torch.save and write it atomically.

    A failed write (full disk, I/O error) leaves the previous file untouched and raises
    CheckpointError.
    """
    import io

    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    try:
        atomic_write_bytes(Path(path), buffer.getvalue(), keep_previous)
    except OSError as exc:
        raise CheckpointError(
            f"could not write checkpoint {path} ({exc.strerror or exc}); the previous "
            "checkpoint is intact: free disk space and continue with --resume"
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; CheckpointError for missing, truncated, unsafe or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        found = [ln for ln in lines if "Unsupported" in ln or "global" in ln.lower()]
        first = (found or lines or ["unsafe content"])[0]
        raise CheckpointError(
            f"refusing to load {path}: it contains objects that weights_only loading does not "
            f"allow ({first[:160]}); only load checkpoints written by selfkd"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); "
            "use an earlier checkpoint or retrain"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a selfkd checkpoint (no '{FORMAT}' marker)")
    return data


def load_latest(path: Path, previous: Path, map_location: Any = "cpu") -> tuple[dict, Path]:
    """Load ``path``; if it is missing or corrupt, fall back to ``previous`` (with a warning)."""
    import warnings

    try:
        return load_checkpoint(path, map_location), path
    except CheckpointError as exc:
        if not previous.is_file():
            raise
        warnings.warn(f"{exc}; using the previous checkpoint {previous}", stacklevel=2)
        return load_checkpoint(previous, map_location), previous


def model_differences(theirs: Any, ours: dict[str, Any]) -> list[str]:
    """``model.name`` / ``model.options.*`` that differ between a checkpoint's model config
    (``meta["config"]["model"]``) and this run's, as ``key=theirs (this run: ours)`` strings."""
    if not isinstance(theirs, dict):
        return []
    diffs = []
    if theirs.get("name") != ours.get("name"):
        diffs.append(f"model.name={theirs.get('name')!r} (this run: {ours.get('name')!r})")
        return diffs  # another architecture: its options are not comparable
    a, b = theirs.get("options") or {}, ours.get("options") or {}
    for key in sorted(set(a) | set(b), key=str):
        if a.get(key) != b.get(key):
            shown = [repr(o[key]) if key in o else "default" for o in (a, b)]
            diffs.append(f"model.options.{key}={shown[0]} (this run: {shown[1]})")
    return diffs


def check_compatible(
    meta: dict[str, Any],
    model: nn.Module,
    num_classes: int,
    what: str,
    model_config: dict[str, Any] | None = None,
) -> None:
    """Refuse a checkpoint whose model differs from ``model`` (architecture or class count).

    With ``model_config`` (this run's ``{"name": ..., "options": {...}}``) a model of another
    architecture is refused naming the model keys that differ, e.g. ``model.options.width``.
    """
    ckpt_classes = meta.get("num_classes")
    if ckpt_classes is not None and ckpt_classes != num_classes:
        raise CheckpointError(
            f"{what} was trained with {ckpt_classes} classes but this run has {num_classes}; "
            "use a checkpoint trained on the same dataset"
        )
    ours = model_fingerprint(model)
    theirs = meta.get("fingerprint")
    if theirs is not None and theirs != ours:
        config = meta.get("config")
        diffs = (
            model_differences(config.get("model"), model_config)
            if model_config is not None and isinstance(config, dict)
            else []
        )
        channels, here = meta.get("in_channels"), _in_channels(model)
        if channels is not None and here is not None and channels != here:
            diffs.append(f"input channels={channels} (this run: {here})")
        if diffs:
            raise CheckpointError(
                f"{what} holds another model than this run builds: {'; '.join(diffs)}; use a "
                "checkpoint of the same architecture and options"
            )
        raise CheckpointError(
            f"{what} holds model {meta.get('model', '?')!r} "
            f"(fingerprint {theirs}) but this run builds {type(model).__name__!r}"
            f" (fingerprint {ours}); use a checkpoint of the same architecture and options"
        )


def _in_channels(model: nn.Module) -> int | None:
    """The input channels of ``model``'s first convolution (None if it has none)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return None
