"""A run's resumable state: its progress counters, the checkpoint payload, and restoring it.

A checkpoint holds the model, the method's state (banks, critic, ...), the optimizer, the
gradient scaler, the RNG states and the progress, so a resumed run continues at the step after
the checkpoint with every generator where it was. Under DDP the payload holds every rank's RNG
state (and the state a method keeps per rank, e.g. DLB's previous batch), so a resume with the
same world size is exact; with another world size ranks ``r > 0`` start fresh streams.

Random numbers: all ranks build the model and method with ``run.seed``; afterwards rank
``r > 0`` reseeds with :func:`rank_seed` (``run.seed``, ``r``) so augmentations differ between
ranks (rank 0 keeps the single-process stream).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from selfkd.engine import checkpoint as ckpt
from selfkd.engine import distributed as D
from selfkd.engine.device import rng_state, seed_everything, set_rng_state
from selfkd.errors import CheckpointError

if TYPE_CHECKING:
    from selfkd.engine.runtime import Runtime


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint as ``progress``."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # > 0 only in a mid-epoch checkpoint (a stop signal)
    partial: dict[str, Any] | None = None  # that epoch's training sums so far
    global_step: int = 0
    best_value: float | None = None
    best_epoch: int | None = None
    skipped_steps: int = 0
    train_seconds: float = 0.0

    def load(self, progress: dict[str, Any], rank: int) -> None:
        """Take the values of a checkpoint's ``progress`` (in place)."""
        partial = progress.get("partial")
        if partial is not None and rank > 0:
            # mid-epoch sums in a checkpoint are global (reduced over ranks): rank 0 carries them
            partial = {**partial, "sums": {}, "seen": 0, "wrong": 0.0}
        self.epoch = int(progress["epoch"])
        self.step_in_epoch = int(progress.get("step_in_epoch", 0))
        self.partial = partial
        self.global_step = int(progress["global_step"])
        self.best_value = progress.get("best_value")
        self.best_epoch = progress.get("best_epoch")
        self.skipped_steps = int(progress.get("skipped_steps", 0))
        self.train_seconds = float(progress.get("train_seconds", 0.0))


def rank_seed(seed: int, rank: int) -> int:
    """The seed rank ``rank > 0`` continues with after the model and method are built."""
    from selfkd.data.loader import epoch_seed

    return epoch_seed(seed ^ 0x5EED, rank) % 2**62


def seed_rank(seed: int, rank: int, deterministic: bool) -> None:
    """Give rank ``rank > 0`` its own random stream (rank 0 keeps the single-process one)."""
    if rank > 0:
        seed_everything(rank_seed(seed, rank), deterministic)


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (nested dicts, lists, tuples) moved to the CPU."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def checkpoint_meta(
    resolved: dict[str, Any], model: nn.Module, model_name: str, dataset: str, data: Any
) -> dict[str, Any]:
    """What a checkpoint says about itself: versions, config, model fingerprint, data."""
    return {
        **ckpt.versions(),
        "config": resolved,
        "fingerprint": ckpt.model_fingerprint(model),
        "model": model_name,
        "dataset": dataset,
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
    }


class TrainState:
    """The resumable parts of a run: model, method, optimizer, gradient scaler and progress."""

    def __init__(
        self,
        model: nn.Module,
        method: Any,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
    ) -> None:
        self.model, self.method, self.optimizer, self.scaler = model, method, optimizer, scaler
        self.progress = Progress()

    def payload(self, meta: dict[str, Any], world_size: int) -> dict[str, Any]:
        """The checkpoint dict. Under DDP every rank must call it (it gathers the RNG states)."""
        extra: dict[str, Any] = {}
        if world_size > 1:
            extra["rng_ranks"] = D.all_gather_object(rng_state())
            if self.method.rank_local_extra_state:  # e.g. DLB's previous batch, per rank
                extra["method_ranks"] = D.all_gather_object(to_cpu(self.method.rank_state()))
        return {
            **extra,
            "meta": meta,
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "progress": asdict(self.progress),
        }

    def restore(
        self,
        data: dict[str, Any],
        *,
        source: Path,
        num_classes: int,
        model_config: dict[str, Any] | None,
        runtime: Runtime,
        run_cfg: Any,
    ) -> None:
        """Load checkpoint ``data`` (named ``source`` in errors) into the parts, the RNG streams
        and the progress. A CheckpointError when it does not fit this run's model or method."""
        ckpt.check_compatible(
            data.get("meta", {}), self.model, num_classes, f"checkpoint {source}", model_config
        )
        rank, world_size = runtime.rank, runtime.world_size
        try:
            self.model.load_state_dict(data["model"])
            self.method.load_state_dict(data["method"])
            self.optimizer.load_state_dict(data["optimizer"])
            self.scaler.load_state_dict(data["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise CheckpointError(
                f"checkpoint {source} does not match this run's model or method ({first}); "
                "resume with the config it was written with"
            ) from None
        own = data.get("method_ranks")
        if world_size > 1 and isinstance(own, list) and len(own) == world_size:
            self.method.load_rank_state(own[rank])  # else every rank keeps rank 0's
        ranks = data.get("rng_ranks")
        if world_size > 1 and isinstance(ranks, list) and len(ranks) == world_size:
            set_rng_state(ranks[rank])
        else:
            set_rng_state(data["rng"])
            if world_size > 1:  # another world size: fresh rank streams
                step = int(data["progress"]["global_step"])
                seed_rank(run_cfg.seed + step, rank, run_cfg.deterministic)
        self.progress.load(data["progress"], rank)
