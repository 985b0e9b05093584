"""What may change when a run is resumed.

A resumed run must continue the experiment its checkpoint belongs to: every config key that
shapes training (data, model, schedule, method, seed, precision, ...) must equal the one the
checkpoint was written with. Only the keys in :data:`RESUME_MAY_CHANGE` may differ: they say
where and how fast the run executes, or what it logs, not what it learns. (Speed and device
settings can change floating-point rounding, so a resume that changes them is not bit-exact.)

``train.epochs`` is not among them: a longer run moves milestone fractions, warm-up and the
cosine schedule, so the epochs already trained would not belong to the new schedule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from pathlib import Path
from typing import Any

from selfkd.config import Config
from selfkd.engine import checkpoint as ckpt
from selfkd.errors import ConfigError, SelfKDError
from selfkd.methods import build_method

#: top-level sections that record the environment (versions, host, ...), not a setting
IGNORED_SECTIONS: frozenset[str] = frozenset({"meta"})

#: config keys a resume may change (dotted); everything else must match the checkpoint
RESUME_MAY_CHANGE: frozenset[str] = frozenset(
    {
        "run.name",
        "run.out_dir",
        "run.device",
        "run.threads",
        "run.progress",
        "run.tensorboard",
        "run.loggers",
        "run.project",
        "run.log_every",
        "run.check_every",
        "run.compile",
        "run.channels_last",
        "data.root",
        "data.download",
        "data.workers",
        "data.eval_batch_size",
    }
)

_MISSING = object()
FIRST = ("method.name", "model.name", "data.name")


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b.c": leaf}`` (lists and other values are leaves)."""
    if not isinstance(data, dict) or (prefix and not data):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(
    trained: dict[str, Any],
    now: dict[str, Any],
    defaults: dict[str, Any] | None = None,
    may_change: Collection[str] = (),
) -> list[tuple[str, Any, Any]]:
    """``(key, trained_value, new_value)`` for every key outside :data:`RESUME_MAY_CHANGE` (and
    ``may_change``) that differs between the resolved config a checkpoint was trained with and
    this run's.

    A key the checkpoint's config lacks (added in a later version) counts as its value in
    ``defaults`` (a resolved config of defaults), so older checkpoints stay resumable.
    """
    old, new, base = (
        flatten({k: v for k, v in d.items() if k not in IGNORED_SECTIONS})
        for d in (trained, now, defaults or {})
    )
    found = []
    for key in [*new, *(k for k in old if k not in new)]:
        if key in RESUME_MAY_CHANGE or key in may_change:
            continue
        before, after = old.get(key, _MISSING), new.get(key, _MISSING)
        if before is _MISSING:
            before = base.get(key, _MISSING)
            if before is _MISSING:
                continue  # unknown to the old version and no default: cannot compare
        if after is _MISSING:
            continue  # a key this version no longer has
        if before != after:
            found.append((key, before, after))
    # what changes the experiment most is named first (within the limit of the message)
    found.sort(key=lambda item: item[0] not in FIRST)
    return found


def describe_differences(found: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    """``"train.lr (0.05 -> 0.1), run.seed (0 -> 1)"``, at most ``limit`` keys then a count."""

    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{key} ({short(a)} -> {short(b)})" for key, a, b in found[:limit]]
    if len(found) > limit:
        parts.append(f"and {len(found) - limit} more")
    return ", ".join(parts)


def check_resume_config(
    meta: dict[str, Any],
    resolved: dict[str, Any],
    method_name: str,
    run_path: Path,
    may_change: Collection[str] = (),
) -> None:
    """Refuse to resume ``run_path`` with a config (``resolved``) that shapes training otherwise
    than its checkpoint's (``meta["config"]``): a ConfigError naming the keys."""
    trained = meta.get("config")
    if not isinstance(trained, dict):
        return  # a checkpoint without its config (not written by the trainer)
    defaults = Config().to_dict()
    with contextlib.suppress(SelfKDError, TypeError, ValueError):
        defaults["method"] = build_method({"name": method_name}).describe()
    found = config_differences(trained, resolved, defaults, may_change=may_change)
    if found:
        raise ConfigError(
            f"cannot resume {run_path}: its checkpoint was trained with another "
            f"config in {describe_differences(found)}; resume with the config it was "
            f"trained with ({run_path / 'config.yaml'}) or start a new run under "
            "another run.name (only execution settings such as run.device, "
            "data.eval_batch_size or run.progress may change on resume)"
        )


def load_for_resume(
    run: Any,
    map_location: Any,
    resolved: dict[str, Any],
    method_name: str,
    may_change: Collection[str] = (),
) -> tuple[dict[str, Any], Path]:
    """The checkpoint to resume ``run`` (a RunDir) from (last.pt, or last.prev.pt when last.pt
    is damaged) and its path, after :func:`check_resume_config` with this run's config."""
    data, path = ckpt.load_latest(run.last, run.last_previous, map_location)
    check_resume_config(data.get("meta", {}), resolved, method_name, run.path, may_change)
    return data, path
