"""Evaluation: a model's logits over an evaluation split (on one process, or gathered from every
rank under DDP), the metrics of an epoch and of a finished run, and ``selfkd eval RUN_DIR``.

Under DDP every rank evaluates its shard of the split; the shards are padded with repeated
samples, so the gathered rows are sorted by sample index and de-duplicated: every rank gets the
logits of the whole split and the metrics are those of the full split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from selfkd import metrics as M
from selfkd.config import Config, load_config
from selfkd.engine import checkpoint as ckpt
from selfkd.engine import distributed as D
from selfkd.engine.build import build_data, build_model
from selfkd.engine.device import amp_dtype, autocast, resolve_device
from selfkd.engine.rundir import CONFIG
from selfkd.errors import ConfigError, RunDirError, TrainingError

if TYPE_CHECKING:
    from selfkd.engine.runtime import Runtime

Split = tuple[Tensor, Tensor]  # float32 CPU logits and their targets


@torch.no_grad()
def _forward_split(
    model: nn.Module,
    loader: Any,
    transform: Any,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Eval-mode forward over ``loader``: float32 logits, targets and indices per batch."""
    was_training = model.training
    model.eval()
    outs, targets, indices = [], [], []
    for x, y, idx in loader.iterate(0):
        x = transform.eval(x.to(device, non_blocking=True))
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = model(x)
        outs.append(logits.float())
        targets.append(y)
        indices.append(idx)
    model.train(was_training)
    return outs, targets, indices


def collect_logits(
    model: nn.Module,
    loader: Any,
    transform: Any,
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Split:
    """Run ``model`` in eval mode over ``loader``; return float32 CPU logits and targets."""
    outs, targets, _ = _forward_split(model, loader, transform, device, dtype, channels_last)
    return torch.cat(outs).cpu(), torch.cat(targets).cpu()


def collect_logits_distributed(
    model: nn.Module,
    loader: Any,
    transform: Any,
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Split:
    """:func:`collect_logits` over this rank's shard, gathered from every rank, in sample-index
    order (the order of an unsharded, unshuffled loader), padding rows dropped."""
    outs, targets, indices = _forward_split(model, loader, transform, device, dtype, channels_last)
    if outs:
        labels = torch.cat(targets).to(device).float()
        rows = torch.cat([torch.cat(outs), labels[:, None]], dim=1)
        index = torch.cat(indices).to(device)
    else:  # an empty shard still takes part in the gather
        k = _num_outputs(model)
        rows = torch.empty(0, k + 1, device=device)
        index = torch.empty(0, dtype=torch.long, device=device)
    index, rows = D.all_gather_rows(index, rows)
    order = torch.argsort(index, stable=True)
    index, rows = index[order], rows[order]
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    rows = rows[first].cpu()
    return rows[:, :-1].contiguous(), rows[:, -1].long()


def _num_outputs(model: nn.Module) -> int:
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Linear):
        return int(classifier.out_features)
    raise TrainingError("an empty evaluation shard needs model.classifier to know the classes")


class Evaluator:
    """A training run's evaluation splits through its eval model (gathered over ranks under
    DDP). ``check(logits, split)`` sees every split's logits first (the non-finite policy)."""

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        runtime: Runtime,
        channels_last: bool,
        check: Callable[[Tensor, str], None],
    ) -> None:
        self.model, self.data, self.channels_last, self.check = model, data, channels_last, check
        self.device, self.dtype = runtime.device, runtime.amp
        self.collect = collect_logits_distributed if runtime.world_size > 1 else collect_logits

    def logits(self, loader: Any) -> Split:
        """Logits and targets of a whole evaluation split (in sample-index order under DDP)."""
        return self.collect(
            self.model, loader, self.data.transform, self.device, self.dtype, self.channels_last
        )

    def splits(self) -> tuple[Split, Split | None]:
        """Test and (when there is one) validation logits, each checked."""
        test = self.logits(self.data.test_loader)
        self.check(test[0], "test")
        val = None
        if self.data.val_loader is not None:
            val = self.logits(self.data.val_loader)
            self.check(val[0], "validation")
        return test, val


def epoch_metrics(test: Split, val: Split | None) -> dict[str, Any]:
    """An epoch's evaluation columns: ``test_*`` and (with a validation split) ``val_*``."""
    row = {f"test_{k}": v for k, v in M.evaluate_logits(*test).items()}
    if val is not None:
        row.update({f"val_{k}": v for k, v in M.evaluate_logits(*val).items()})
    return row


def final_metrics(test: Split, val: Split | None) -> tuple[dict[str, Any], float | None]:
    """Test metrics of a finished run, with temperature scaling fitted on the validation split
    when there is one; returns (metrics, temperature or None)."""
    temperature = M.fit_temperature(*val) if val is not None else None
    return M.evaluate_logits(*test, temperature=temperature), temperature


def improved_value(row: dict[str, Any], metric: str, best: float | None) -> float | None:
    """The value of ``run.best_metric`` in an epoch's row when it improves on ``best`` (None:
    no best yet), else None (also for an epoch that was not evaluated). The metric is read on
    the validation split when there is one, else on the test split."""
    split = "val" if f"val_{metric}" in row else "test"
    value = row.get(f"{split}_{metric}")
    if value is None:
        if not any(k.startswith("test_") for k in row):
            return None  # no evaluation this epoch
        known = sorted(k[5:] for k in row if k.startswith("test_"))
        raise ConfigError(
            f"run.best_metric {metric!r} is not a metric; choose one of {', '.join(known)}"
        )
    lower = M.LOWER_IS_BETTER.get(metric, True)
    if best is None or (value < best if lower else value > best):
        return float(value)
    return None


# --- a run from its directory (selfkd eval) --------------------------------------------------
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
    model = build_model(cfg, data).to(device)
    state = ckpt.load_checkpoint(path, map_location=device)
    ckpt.check_compatible(state.get("meta", {}), model, data.num_classes, f"checkpoint {path}")
    model.load_state_dict(state["model"])
    return model, state


def load_run(run_dir: str | Path, which: str = "last", device: str = "auto") -> LoadedRun:
    """Rebuild data and model from RUN/config.yaml and load RUN/checkpoints/<which>.pt."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise RunDirError(
            f"{run_dir} is not a run directory (no {CONFIG}); "
            "pass the folder a `selfkd train` run wrote"
        )
    cfg = load_config(run_dir / CONFIG)
    dev = resolve_device(device)
    data = build_data(cfg)
    path = run_dir / "checkpoints" / f"{which}.pt"
    model, state = build_model_from_checkpoint(cfg, data, path, dev)
    return LoadedRun(cfg, data, model, dev, amp_dtype(cfg.run.amp, dev), state)


def evaluate_run(run_dir: str | Path, which: str = "last", device: str = "auto") -> dict[str, Any]:
    """Rebuild data and model from RUN/config.yaml, load a checkpoint, return test metrics."""
    run = load_run(run_dir, which, device)
    model, data, dev, dtype = run.model, run.data, run.device, run.dtype
    val = None
    if data.val_loader is not None:
        val = collect_logits(model, data.val_loader, data.transform, dev, dtype)
    test = collect_logits(model, data.test_loader, data.transform, dev, dtype)
    result, _ = final_metrics(test, val)
    result["epoch"] = run.state.get("progress", {}).get("epoch")
    return result
