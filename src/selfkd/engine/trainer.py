"""The training loop. It knows nothing about any particular method.

Per step: move the batch to the device, augment it there (then ``data.mix``: Cutout, Mixup or
CutMix, on half the batch for methods whose ``mixing`` is "split"), ask the method for a loss
(:meth:`Method.training_step`), back-propagate (with a gradient scaler under fp16), clip,
step the optimizer, and let the method update its state (:meth:`Method.after_optimizer_step`).
Per epoch: evaluate on the test split (and the held-out validation split when there is one),
append a metrics row, write ``last.pt`` (and ``best.pt``) atomically. Resuming from ``last.pt``
restores the model, optimizer, method state (banks, critic, ...), gradient scaler, RNG states
and progress, and continues at the next epoch boundary; the data order of every epoch is a
function of (seed, epoch), so a resumed run sees exactly the batches it would have seen.

Distributed data parallel (launched by ``torchrun``; :mod:`selfkd.engine.distributed`):

- **Batch**: ``data.batch_size`` is the *global* batch; each of the ``W`` processes takes
  ``batch_size / W`` samples per step (a ConfigError when it does not divide). The epoch order
  is sharded like ``DistributedSampler`` (:class:`~selfkd.data.EpochLoader`), so one step of a
  W-process run sees the same global batch as one step of a single-process run. A method's
  ``batch_sampler`` (CS-KD's class pairs) is asked for per-process batches (its batches are
  dealt round-robin to the ranks); DLB pairs each rank's consecutive batches.
- **Model**: wrapped in ``DistributedDataParallel`` (gradients averaged over ranks during
  backward). Gradients of the method's ``main_optimizer_modules`` (auxiliary heads) are
  averaged with one all-reduce after backward. BatchNorm: each rank normalizes with its own
  batch statistics (``run.sync_bn: true`` converts to ``SyncBatchNorm``, CUDA only); the
  running statistics are averaged over ranks at the end of every epoch, before evaluation and
  checkpoints, so every replica is identical.
- **Methods**: ``MethodContext.gather`` hands the methods (PS-KD's and AI-KD's prediction banks)
  :func:`~selfkd.engine.distributed.all_gather_rows` (padded to the per-process batch size: one
  all-gather, no host read), so every rank writes every rank's rows;
  ``MethodContext.reduce_grads`` lets a method keep a module it trains itself (AI-KD's critic)
  identical on all ranks. Method parameters are broadcast from rank 0 after ``setup``.
- **Random numbers**: all ranks build the model and method with ``run.seed``; afterwards rank
  ``r > 0`` reseeds with a seed derived from (``run.seed``, ``r``) so augmentations differ
  between ranks (rank 0 keeps the single-process stream). Checkpoints hold every rank's RNG
  state, so a resume with the same world size is exact.
- **Checks, skipped steps and signals**: no step waits for the host (see
  :mod:`selfkd.engine.guard`): a non-finite loss is recorded on the device and read every
  ``run.check_every`` steps, at the end of every epoch and before any checkpoint. Under DDP the
  ranks exchange that flag and "a stop signal arrived" in one small all-reduce at those checks,
  so every rank stops after the same step. ``run.nonfinite: skip`` decides every step (one
  all-reduce per step), so every rank skips the same steps.
- **Metrics**: training sums are all-reduced at the end of the epoch; evaluation runs on each
  rank's shard of the test/val set and the logits are all-gathered and de-duplicated by sample
  index (the sharded loaders pad with repeated samples), so metrics are those of the full split.
  ``data.eval_batch_size`` is per process.
- **Files**: only rank 0 writes (run directory, log, metrics, checkpoints, final.json); the
  others log nothing. On resume every rank reads ``last.pt`` (the run directory must be visible
  to every rank, as on one node).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfkd import metrics as M
from selfkd.config import Config
from selfkd.data.mixing import Mixer
from selfkd.engine import checkpoint as ckpt
from selfkd.engine import distributed as D
from selfkd.engine import loggers as L
from selfkd.engine.device import (
    amp_dtype,
    autocast,
    channels_last_allowed,
    compile_options,
    peak_memory_mb,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from selfkd.engine.guard import NonFinite, NonFiniteWatch, step_values
from selfkd.engine.optim import build_optimizer, lr_at, set_lr
from selfkd.engine.resume import config_differences, describe_differences
from selfkd.engine.rundir import RunDir, check_resumable, close_logger
from selfkd.engine.runinfo import run_metadata
from selfkd.errors import (
    CheckpointError,
    ConfigError,
    RunInterrupted,
    SelfKDError,
    TrainingError,
)
from selfkd.methods import Batch, Method, MethodContext, StepInfo, build_method
from selfkd.methods.base import mix_split

Callback = Callable[["Trainer", int], None]


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP keyword that keeps buffers rank-local between epochs (the name changed in torch)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    names = inspect.signature(DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in names:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _null_logger(name: str) -> logging.Logger:
    """A logger that writes nothing (ranks other than 0 under DDP)."""
    logger = logging.getLogger(f"selfkd.run.{name}.{os.getpid()}.null")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def _rank_seed(seed: int, rank: int) -> int:
    """The seed rank ``rank > 0`` continues with after the model and method are built."""
    from selfkd.data.loader import epoch_seed

    return epoch_seed(seed ^ 0x5EED, rank) % 2**62


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def wants_progress_bar(mode: str) -> bool:
    if mode == "bar":
        return True
    if mode == "off":
        return False
    return sys.stderr.isatty() and not os.environ.get("CI")


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
) -> tuple[Tensor, Tensor]:
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
) -> tuple[Tensor, Tensor]:
    """:func:`collect_logits` over this rank's shard, gathered from every rank.

    The shards are padded with repeated samples (same index); the gathered rows are sorted by
    sample index and de-duplicated, so every rank returns the logits of the whole split, in
    index order (the order of an unsharded, unshuffled loader).
    """
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


def _to_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (nested dicts, lists, tuples) moved to the CPU."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _num_outputs(model: nn.Module) -> int:
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Linear):
        return int(classifier.out_features)
    raise TrainingError("an empty evaluation shard needs model.classifier to know the classes")


def _abandon_on_failure(init: Callable[..., None]) -> Callable[..., None]:
    """``Trainer.__init__`` that, when it fails, releases the run directory and removes the
    folder it created (so a refused run leaves nothing behind that blocks a rerun)."""

    @functools.wraps(init)
    def wrapper(self: Trainer, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except BaseException:
            self._abandon()
            raise

    return wrapper


class Trainer:
    """Trains one model with one method under one config, in one run directory.

    ``model`` and ``data`` may be given (Python API: any ``nn.Module`` returning logits, any
    :class:`~selfkd.data.DataBundle`); otherwise they are built from the config's registries.
    """

    @_abandon_on_failure
    def __init__(
        self,
        cfg: Config,
        *,
        model: nn.Module | None = None,
        data: Any = None,
        method: Method | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        quiet: bool = False,
        callbacks: Sequence[Callback] = (),
        resume_may_change: Collection[str] = (),
    ) -> None:
        self.cfg = cfg
        self.resume = resume
        #: config keys a resume may change besides RESUME_MAY_CHANGE (e.g. for a phase-1 run)
        self.resume_may_change = frozenset(resume_may_change)
        self.callbacks = list(callbacks)
        if cfg.run.threads is not None:
            torch.set_num_threads(cfg.run.threads)
        self.dist, dist_device = D.init_distributed(cfg.run.device)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.is_main = self.rank == 0
        self.device = dist_device if dist_device is not None else resolve_device(cfg.run.device)
        self.amp = amp_dtype(cfg.run.amp, self.device)
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        if cfg.data.batch_size % self.world_size:
            raise ConfigError(
                f"data.batch_size {cfg.data.batch_size} is the global batch and must be divisible "
                f"by the {self.world_size} processes; choose a multiple of {self.world_size}"
            )
        #: samples per step on this process (data.batch_size is the global batch)
        self.batch_size = cfg.data.batch_size // self.world_size
        self.sync_bn = bool(getattr(cfg.run, "sync_bn", False)) and self.world_size > 1
        if self.sync_bn and self.device.type != "cuda":
            raise ConfigError("run.sync_bn needs CUDA (SyncBatchNorm has no CPU kernel)")

        self.run = RunDir(run_dir or Path(cfg.run.out_dir) / cfg.run.name)
        self._created_dir = self.is_main and not self.run.path.exists()
        # Check the run directory before any expensive work (dataset loading).
        if self.run.holds_run() and not (resume or overwrite):
            self.run.prepare(resume=False, overwrite=False)  # raises RunDirError
        #: a --resume of a run that stopped before its first checkpoint starts it again
        self.restarted = False
        if resume and not self.run.has_checkpoint():
            check_resumable(self.run)
            resume, overwrite, self.restarted = False, True, True
            self.resume = False
        D.barrier()  # every rank has checked the directory before rank 0 writes into it
        #: run.loggers (csv first); a missing tracker client is refused before the data loads
        self.logger_names = L.logger_names(cfg.run)
        L.require_clients(self.logger_names)

        self.data = data if data is not None else self._build_data()
        loader_world = getattr(self.data.train_loader, "world_size", 1)
        if loader_world != self.world_size:
            raise ConfigError(
                f"the data's train loader is sharded for {loader_world} process(es) but this run "
                f"has {self.world_size}; build it with build_data(rank=, world_size=)"
            )
        self._user_model = model is not None
        self.model = model if model is not None else self._build_model()
        if self.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        self.method = method if method is not None else build_method(cfg.method)
        # data.mix: refused before the run directory is touched if the method cannot take it
        self.mixer = Mixer.from_spec(cfg.data.mix_spec, image_size=self._input_shape()[1:])
        self.mix_split = mix_split(cfg.data.mix_spec, self.method)
        if cfg.run.best_metric == "top5_err" and self.data.num_classes < 5:
            raise ConfigError(
                f"run.best_metric top5_err needs at least 5 classes, the data has "
                f"{self.data.num_classes}; choose top1_err"
            )
        resumed = None
        if resume:  # refused before anything in the run directory changes
            resumed = ckpt.load_latest(self.run.last, self.run.last_previous, self.device)
            self._check_resume_config(resumed[0].get("meta", {}))
        if self.is_main:
            self.run.acquire()
            self.run.prepare(resume=resume, overwrite=overwrite)
            self.log = self.run.logger(cfg.run.name, quiet=quiet)
        else:
            self.log = _null_logger(cfg.run.name)
        if self.restarted:
            self.log.info(f"{self.run.path} has no checkpoint yet: starting it from epoch 1")
        D.barrier()

        sampler = self.method.batch_sampler(self.data.train_labels, self.batch_size, cfg.run.seed)
        if sampler is not None:
            self.data.train_loader.set_batch_sampler(sampler)
        steps = len(self.data.train_loader)
        if steps == 0:
            raise ConfigError(
                f"the training split has {self.data.num_train} samples, fewer than one batch of "
                f"{cfg.data.batch_size} with drop_last; lower data.batch_size"
            )
        self.steps_per_epoch = steps
        ctx = MethodContext(
            num_classes=self.data.num_classes,
            num_train=self.data.num_train,
            train_labels=self.data.train_labels,
            epochs=cfg.train.epochs,
            steps_per_epoch=steps,
            device=self.device,
            build_model=self._fresh_model,
            load_model=self.load_compatible_model,
            config=cfg.to_dict(),
            run_dir=self.run.path,
            input_shape=self._input_shape(),
            rank=self.rank,
            world_size=self.world_size,
            reduce_grads=D.reduce_grads if self.world_size > 1 else None,
            # every rank's rows fit in its batch: no count exchange, no host read
            gather=(
                functools.partial(D.all_gather_rows, cap=self.batch_size)
                if self.world_size > 1
                else None
            ),
            batch_size=self.batch_size,
            mix=cfg.data.mix_spec,
        )
        self.method.setup(self.model, ctx)
        self.method.to(self.device)
        #: run.channels_last in effect (not where the CPU's kernels get it wrong: device.py)
        self.channels_last = channels_last_allowed(
            cfg.run.channels_last, self.device, (self.model, self.method)
        )
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        extra_modules = self.method.main_optimizer_modules()
        modules = [self.model, *extra_modules]
        self.optimizer = build_optimizer(modules, cfg.train)
        use_scaler = self.amp == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        #: method-owned modules trained with the model: their gradients are averaged by hand
        self._extra_modules: nn.Module | None = None
        if self.world_size > 1:
            D.broadcast_module(self.method)  # owned heads, critic: rank 0's initial weights
            if extra_modules:
                self._extra_modules = nn.ModuleList(extra_modules)
        self._stop_everywhere = False
        #: device-side record of the first non-finite step (run.nonfinite: stop), read at checks
        self._watch = NonFiniteWatch(self.device)

        self.epoch = 0
        self.step_in_epoch = 0  # > 0 only while resuming in the middle of an epoch
        self._partial: dict[str, Any] | None = None
        self._stop_signal: int | None = None
        self.global_step = 0
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.skipped_steps = 0
        self.train_seconds = 0.0
        #: experiment trackers (rank 0), started by fit(); see selfkd.engine.loggers
        self.trackers = L.Trackers([], self.log.info)
        #: versions, git commit, host, devices, world size (config.yaml meta, final.json)
        self.run_meta = run_metadata(self.device, self.world_size)
        if self.world_size > 1 and self.rank > 0:
            # augmentations differ between ranks; the model and method were built alike
            seed_everything(_rank_seed(cfg.run.seed, self.rank), cfg.run.deterministic)
        if resumed is not None:
            state, self._resumed_from = resumed
            self._restore(state)
        # the model the engine trains: DDP averages gradients during backward
        self.ddp_model: nn.Module | None = None
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(
                self.model,
                device_ids=ids,
                output_device=ids[0] if ids else None,
                **_no_forward_buffer_sync(),
            )
        self.forward_model: nn.Module = self.ddp_model or self.model
        self.eval_model: nn.Module = self.model
        if cfg.run.compile:
            # methods read features through forward hooks (selfkd.models.taps); by default
            # dynamo does not guard on hooks, so code compiled earlier in this process for the
            # same model class (a sweep's previous run, phase 1) would run without them
            torch._dynamo.config.skip_nnmodule_hook_guards = False
            options = compile_options(self.device, (self.model, self.method))
            self.forward_model = torch.compile(self.forward_model, **options)
            self.eval_model = (
                self.forward_model
                if self.ddp_model is None
                else torch.compile(self.model, **options)
            )
        if self.is_main:
            self.run.write_config({**self.resolved_config(), "meta": self.run_meta})

    # --- construction -----------------------------------------------------------------------
    def _build_data(self) -> Any:
        from selfkd.data import build_data_from_config

        return build_data_from_config(
            self.cfg.data,
            self.cfg.run.seed,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
        )

    def _input_shape(self) -> tuple[int, int, int]:
        size = self.data.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.data.in_channels), int(height), int(width))

    def _build_model(self) -> nn.Module:
        from selfkd.models import build_model

        return build_model(
            self.cfg.model.name,
            num_classes=self.data.num_classes,
            in_channels=self.data.in_channels,
            **self.cfg.model.options,
        )

    def _fresh_model(self) -> nn.Module:
        """A new, untrained model of this run's architecture, on the device."""
        if self._user_model:
            model = copy.deepcopy(self.model)
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        else:
            model = self._build_model()
        return model.to(self.device)

    def load_compatible_model(self, path: str) -> nn.Module:
        """Load a trained model (e.g. AI-KD's superior) after checking it fits this run."""
        data = ckpt.load_checkpoint(path, map_location=self.device)
        meta = data.get("meta", {})
        dataset = meta.get("dataset")
        if dataset is not None and dataset != self.cfg.data.name:
            raise CheckpointError(
                f"{path} was trained on dataset {dataset!r}, this run uses "
                f"{self.cfg.data.name!r}; train the superior model on the same data"
            )
        model = self._fresh_model()
        ckpt.check_compatible(
            meta, model, self.data.num_classes, f"checkpoint {path}", self._model_config()
        )
        model.load_state_dict(data["model"])
        return model

    def resolved_config(self) -> dict[str, Any]:
        """The config with every default filled in; still a valid config file."""
        resolved = self.cfg.to_dict()
        resolved["method"] = self.method.describe()
        info = getattr(self.data, "resolved", None) or {}
        if "mean" in info and "std" in info and resolved["data"].get("normalize") is None:
            resolved["data"]["normalize"] = {"mean": list(info["mean"]), "std": list(info["std"])}
        for key in ("crop_padding", "hflip"):
            if key in info and key not in resolved["data"]["augment"]:
                resolved["data"]["augment"][key] = info[key]
        if self.mixer is not None:
            resolved["data"]["mix"] = self.mixer.describe(split=self.mix_split)
        return resolved

    def _abandon(self) -> None:
        """After a failed construction: close the log, release the lock, and remove the run
        folder if this trainer created it and it holds no run (only the log, lock, empty
        checkpoints folder)."""
        log = getattr(self, "log", None)
        if log is not None:
            close_logger(log)
        run = getattr(self, "run", None)
        if run is None:
            return
        run.release()
        if getattr(self, "_created_dir", False) and not run.holds_run():
            run.remove_empty()

    def _model_config(self) -> dict[str, Any] | None:
        """This run's ``model`` section (None for a model given through the Python API)."""
        return None if self._user_model else self.cfg.to_dict()["model"]

    def _check_resume_config(self, meta: dict[str, Any]) -> None:
        """Refuse to resume with a config that shapes training otherwise than the checkpoint's
        (:mod:`selfkd.engine.resume`): ConfigError naming the keys."""
        trained = meta.get("config")
        if not isinstance(trained, dict):
            return  # a checkpoint without its config (not written by the trainer)
        defaults = Config().to_dict()
        with contextlib.suppress(SelfKDError, TypeError, ValueError):
            defaults["method"] = build_method({"name": self.method.name}).describe()
        found = config_differences(
            trained, self.resolved_config(), defaults, may_change=self.resume_may_change
        )
        if found:
            raise ConfigError(
                f"cannot resume {self.run.path}: its checkpoint was trained with another "
                f"config in {describe_differences(found)}; resume with the config it was "
                f"trained with ({self.run.path / 'config.yaml'}) or start a new run under "
                "another run.name (only execution settings such as run.device, "
                "data.eval_batch_size or run.progress may change on resume)"
            )

    # --- checkpoints ------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            **ckpt.versions(),
            "config": self.resolved_config(),
            "fingerprint": ckpt.model_fingerprint(self.model),
            "model": self.cfg.model.name if not self._user_model else type(self.model).__name__,
            "dataset": self.cfg.data.name,
            "num_classes": self.data.num_classes,
            "in_channels": self.data.in_channels,
        }

    def checkpoint_payload(self) -> dict[str, Any]:
        """The checkpoint dict. Under DDP every rank must call it (it gathers the RNG states)."""
        extra: dict[str, Any] = {}
        if self.world_size > 1:
            extra["rng_ranks"] = D.all_gather_object(rng_state())
            if self.method.rank_local_extra_state:  # e.g. DLB's previous batch, per rank
                extra["method_ranks"] = D.all_gather_object(_to_cpu(self.method.rank_state()))
        return {
            **extra,
            "meta": self._meta(),
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "progress": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "partial": self._partial,
                "global_step": self.global_step,
                "best_value": self.best_value,
                "best_epoch": self.best_epoch,
                "skipped_steps": self.skipped_steps,
                "train_seconds": self.train_seconds,
            },
        }

    def save_last(self) -> None:
        """Write checkpoints/last.pt atomically, keeping the one it replaces as last.prev.pt.

        Under DDP every rank calls it (the payload gathers every rank's RNG state); rank 0 writes.
        """
        self._save(self.run.last, self.run.last_previous)

    def _save(self, path: Path, keep_previous: Path | None = None) -> None:
        if not self._weights_finite():  # a step with a finite loss can still blow them up
            when = (
                f"after epoch {self.epoch}"
                if self.step_in_epoch == 0
                else f"at epoch {self.epoch + 1}, step {self.step_in_epoch}"
            )
            self._raise_nonfinite(
                f"the model's weights are no longer finite {when} (a step whose loss was still "
                f"finite blew them up); {path.name} was not written"
            )
        payload = self.checkpoint_payload()
        if self.is_main:
            ckpt.save_checkpoint(path, payload, keep_previous)

    def _restore(self, data: dict[str, Any]) -> None:
        meta = data.get("meta", {})
        ckpt.check_compatible(
            meta,
            self.model,
            self.data.num_classes,
            f"checkpoint {self.run.last}",
            self._model_config(),
        )
        try:
            self.model.load_state_dict(data["model"])
            self.method.load_state_dict(data["method"])
            self.optimizer.load_state_dict(data["optimizer"])
            self.scaler.load_state_dict(data["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise CheckpointError(
                f"checkpoint {self.run.last} does not match this run's model or method ({first}); "
                "resume with the config it was written with"
            ) from None
        own = data.get("method_ranks")
        if self.world_size > 1 and isinstance(own, list) and len(own) == self.world_size:
            self.method.load_rank_state(own[self.rank])  # else every rank keeps rank 0's
        ranks = data.get("rng_ranks")
        if self.world_size > 1 and isinstance(ranks, list) and len(ranks) == self.world_size:
            set_rng_state(ranks[self.rank])
        else:
            set_rng_state(data["rng"])
            if self.world_size > 1 and self.rank > 0:  # another world size: fresh rank streams
                seed_everything(
                    _rank_seed(self.cfg.run.seed + int(data["progress"]["global_step"]), self.rank),
                    self.cfg.run.deterministic,
                )
        progress = data["progress"]
        self.epoch = int(progress["epoch"])
        self.step_in_epoch = int(progress.get("step_in_epoch", 0))
        self._partial = progress.get("partial")
        if self._partial is not None and self.rank > 0:
            # mid-epoch sums in a checkpoint are global (reduced over ranks): rank 0 carries them
            self._partial = {**self._partial, "sums": {}, "seen": 0, "wrong": 0.0}
        self.global_step = int(progress["global_step"])
        self.best_value = progress.get("best_value")
        self.best_epoch = progress.get("best_epoch")
        self.skipped_steps = int(progress.get("skipped_steps", 0))
        self.train_seconds = float(progress.get("train_seconds", 0.0))

    # --- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``train.epochs`` (continuing after a resume); return the final metrics."""
        cfg = self.cfg
        status = "interrupted"  # for the trackers: finished, failed or interrupted
        try:
            self._install_signal_handlers()
            self._start_trackers()
            if self.resume:
                self.log.info(
                    f"resuming {self.run.path} at epoch {self.epoch + 1}/{cfg.train.epochs}"
                    + (f", step {self.step_in_epoch + 1}" if self.step_in_epoch else "")
                )
            else:
                self.log.info(
                    f"run {self.run.path}: method {self.method.name}, model {self.cfg.model.name} "
                    f"({count_parameters(self.model):,} parameters), data {cfg.data.name} "
                    f"({self.data.num_train} train images, {self.data.num_classes} classes), "
                    f"device {self.device}, "
                    f"{cfg.train.epochs} epochs x {self.steps_per_epoch} steps"
                )
            while self.epoch < cfg.train.epochs:
                row = self.train_epoch(self.epoch)
                self.epoch += 1
                if self.epoch % cfg.run.eval_every == 0 or self.epoch == cfg.train.epochs:
                    row.update(self.evaluate_epoch())
                if self.is_main:
                    self.run.append_row(row)
                    self.trackers.log_epoch(row)
                self._log_row(row)
                self._update_best(row)
                self.save_last()
                if self.best_epoch == self.epoch:
                    self._save(self.run.best)
                for callback in self.callbacks:
                    callback(self, self.epoch)
            final = self.finalize()
            status = "finished"
        except (SelfKDError, RuntimeError, ValueError, OSError) as exc:
            status = "interrupted" if isinstance(exc, RunInterrupted) else "failed"
            self._record_failure(exc)
            raise
        finally:
            self._restore_signal_handlers()
            self.trackers.close(status)
            close_logger(self.log)
            if self.is_main:
                self.run.clean_temporaries()  # still under the lock
            self.run.release()
        return final

    def _start_trackers(self) -> None:
        """Start run.loggers' trackers (rank 0) and give them the resolved config."""
        if not self.is_main or len(self.logger_names) == 1:
            return  # csv only: the run directory writes it
        self.trackers = L.open_trackers(
            self.logger_names,
            self.run.path,
            run_name=self.cfg.run.name,
            project=self.cfg.run.project,
            resume=self.resume,
            warn=self.log.info,
        )
        self.trackers.log_config({**self.resolved_config(), "meta": self.run_meta})

    def _record_failure(self, exc: BaseException) -> None:
        """Mark the run as failed in final.json (reports list it); resuming is still possible."""
        if not self.is_main or isinstance(exc, RunInterrupted):
            return
        lines = str(exc).strip().splitlines()
        with contextlib.suppress(OSError):
            self.run.write_final(
                {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500],
                    "epoch": self.epoch,
                    "global_step": self.global_step,
                    "method": self.method.name,
                    "seed": self.cfg.run.seed,
                    **self.run_meta,
                }
            )

    # --- signals ----------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT ask the loop to checkpoint after the current step and stop."""
        self._old_handlers: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return

        def ask_to_stop(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:  # a second signal: stop at once
                raise KeyboardInterrupt
            self._stop_signal = signum

        for signum in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[signum] = signal.signal(signum, ask_to_stop)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in getattr(self, "_old_handlers", {}).items():
            signal.signal(signum, handler)
        self._old_handlers = {}

    def _stop_if_asked(
        self, epoch: int, sums: dict[str, Tensor], seen: int, wrong: Tensor, start: float
    ) -> None:
        """After a step: if a signal arrived, write a mid-epoch checkpoint and stop.

        Under DDP the decision is the same on every rank (made at a check point, see
        :meth:`_check`): a signal on any rank stops all of them after the same step.
        """
        stop = self._stop_everywhere if self.world_size > 1 else self._stop_signal is not None
        if not stop:
            return
        if self.world_size == 1:
            self._check()  # never checkpoint weights a non-finite step has touched
        signum = self._stop_signal if self._stop_signal is not None else signal.SIGTERM
        if self.world_size > 1:
            # BatchNorm running statistics are linear in their updates: averaging them now or at
            # the end of the epoch gives the same result, and the checkpoint holds every rank's
            D.sync_buffers(self.model)
            sums, seen, wrong = self._reduce_sums(sums, seen, wrong)
        self._partial = {
            "sums": {k: float(v) for k, v in sums.items()},
            "seen": seen,
            "wrong": float(wrong),
            "seconds": time.perf_counter() - start,
        }
        self.save_last()
        name = signal.Signals(signum).name
        message = (
            f"stopped by {name} at epoch {epoch + 1}, step {self.step_in_epoch}/"
            f"{self.steps_per_epoch}; saved {self.run.last}; continue with --resume"
        )
        self.log.info(message)
        raise RunInterrupted(message, signum)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch (from ``self.step_in_epoch`` when resuming mid-epoch)."""
        cfg = self.cfg
        self.model.train()
        self.method.train()
        first = self.step_in_epoch
        partial = self._partial or {}
        if first == 0:
            self.method.on_epoch_start(self.model, epoch)
        sums: dict[str, Tensor] = {
            k: torch.tensor(v, device=self.device) for k, v in partial.get("sums", {}).items()
        }
        seen = int(partial.get("seen", 0))
        wrong = torch.tensor(float(partial.get("wrong", 0)), device=self.device)
        start = time.perf_counter() - float(partial.get("seconds", 0.0))
        self._partial = None
        loader = self.data.train_loader
        bar = None
        if wants_progress_bar(cfg.run.progress):
            from tqdm import tqdm

            bar = tqdm(
                total=len(loader),
                desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                leave=False,
                dynamic_ncols=True,
            )
            bar.update(first)
        check_every = cfg.run.check_every
        #: run.log_every: a line every N steps when no bar shows (one host read each)
        log_every = cfg.run.log_every if self.is_main else 0
        last_step = self.steps_per_epoch - 1
        checking = True
        for step, (x, y, idx) in enumerate(loader.iterate(epoch, first), start=first):
            result = self.train_step(x, y, idx, epoch, step)
            self.global_step += 1
            self.step_in_epoch = step + 1
            checking = self.global_step % check_every == 0 or step == last_step
            if checking:
                self._check()
            if result is None:
                self._stop_if_asked(epoch, sums, seen, wrong, start)
                continue  # a skipped non-finite step
            out, loss, lr = result
            n = out.targets.shape[0]
            seen += n
            with torch.no_grad():
                terms = {
                    "loss": loss.detach(),
                    **{k: v.detach().float() for k, v in out.terms.items()},
                }
                for key, value in terms.items():
                    sums[key] = sums.get(key, torch.zeros((), device=self.device)) + value * n
                wrong += (out.logits.detach().argmax(1) != out.targets).sum()
            if bar is not None:
                bar.update(1)
                if checking:  # the host reads the loss only where it checks anyway
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.4g}")
            elif log_every and (step + 1) % log_every == 0:
                self._log_step(epoch, step, loss, lr, start)
            self._stop_if_asked(epoch, sums, seen, wrong, start)
        if bar is not None:
            bar.close()
        if not checking:
            self._check()  # an epoch ends checked: its checkpoint never holds diverged weights
        self.step_in_epoch = 0
        if self.world_size > 1:
            D.sync_buffers(self.model)  # BatchNorm running statistics: the mean over ranks
            sums, seen, wrong = self._reduce_sums(sums, seen, wrong)
        self.method.on_epoch_end(self.forward_model, epoch)
        skipped = getattr(loader, "epoch_skipped", 0)
        if skipped:
            self.log.info(
                f"epoch {epoch + 1}: skipped {skipped} corrupt image(s), "
                f"{loader.skipped} in all (data.skip_corrupt)"
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr_at(cfg.train, self.global_step - 1, self.steps_per_epoch),
        }
        for key, value in sums.items():
            row[f"train_{key}"] = float(value) / max(1, seen)
        row["train_top1_err"] = 100.0 * float(wrong) / max(1, seen)
        row["train_seconds"] = seconds
        row["sec_per_iter"] = seconds / max(1, self.steps_per_epoch)
        if self.skipped_steps:
            row["skipped_steps"] = self.skipped_steps
        if getattr(loader, "skipped", 0):
            row["skipped_images"] = loader.skipped
        return row

    def _log_step(self, epoch: int, step: int, loss: Tensor, lr: float, start: float) -> None:
        """One ``run.log_every`` line: epoch, step, this step's loss, lr, time in the epoch."""
        seconds = time.perf_counter() - start
        self.log.info(
            f"epoch {epoch + 1}/{self.cfg.train.epochs} step {step + 1}/{self.steps_per_epoch} "
            f"loss={loss.detach().item():.4f} lr={lr:.4g} ({seconds:.1f}s)"
        )

    def _reduce_sums(
        self, sums: dict[str, Tensor], seen: int, wrong: Tensor
    ) -> tuple[dict[str, Tensor], int, Tensor]:
        """Training sums of every rank added up (keys missing on a rank count as 0)."""
        keys = sorted(set().union(*D.all_gather_object(sorted(sums))))
        zero = torch.zeros((), device=self.device)
        local = [sums.get(k, zero).float().reshape(()) for k in keys]
        flat = torch.stack([*local, torch.tensor(float(seen), device=self.device), wrong.float()])
        flat = D.all_reduce_sum(flat.double())
        total = {k: flat[i] for i, k in enumerate(keys)}
        return total, round(float(flat[-2])), flat[-1]

    def train_step(
        self, x: Tensor, y: Tensor, idx: Tensor, epoch: int, step: int
    ) -> tuple[Any, Tensor, float] | None:
        """One optimizer step on a CPU batch; returns (StepOutput, loss, lr) or None if skipped.

        Does not advance ``global_step`` (the caller does), so benchmarks can call it directly.
        """
        cfg = self.cfg
        transform = self.data.transform
        raw = x.to(self.device, non_blocking=True)
        targets = y.to(self.device, non_blocking=True)
        indices = idx.to(self.device, non_blocking=True)
        inputs = transform.train(raw)
        mix = None
        if self.mixer is not None:
            inputs, mix = self.mixer.apply(inputs, targets, split=self.mix_split)
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        batch = Batch(
            inputs=inputs,
            targets=targets,
            indices=indices,
            raw=raw,
            augment=transform.train,
            mix=mix,
        )
        info = StepInfo(
            epoch=epoch,
            step=step,
            global_step=self.global_step,
            epochs=cfg.train.epochs,
            steps_per_epoch=self.steps_per_epoch,
        )
        lr = lr_at(cfg.train, self.global_step, self.steps_per_epoch)
        set_lr(self.optimizer, lr)
        with autocast(self.device, self.amp):
            out = self.method.training_step(self.forward_model, batch, info)
        loss = out.loss.float()
        if cfg.run.nonfinite == "skip":
            if self._skip_nonfinite(loss, out.terms, info.global_step):
                return None
        else:  # stop: recorded on the device, read at the next check (no host round-trip)
            self._watch.observe(loss, out.terms, info.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self._extra_modules is not None:
            D.reduce_grads(self._extra_modules)  # the DDP wrapper averages the model's only
        if cfg.train.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_optimizer_step(self.forward_model, batch, out)
        return out, loss, lr

    def _skip_nonfinite(self, loss: Tensor, terms: dict[str, Tensor], global_step: int) -> bool:
        """``run.nonfinite: skip``: should this step be skipped? One host read (and under DDP
        one all-reduce, which also carries the stop decision) per step."""
        names, values = step_values(loss, terms)
        bad_here = ~torch.isfinite(values).all()
        if not self._agree(bad_here):
            return False
        found = NonFinite(global_step, dict(zip(names, values.tolist(), strict=True)))
        where = self._describe_nonfinite(found, here=bool(bad_here))
        if not self._weights_finite():
            self._raise_nonfinite(
                f"{where}; the model's weights are no longer finite (an earlier step with a "
                "finite loss blew them up), so skipping steps cannot recover the run"
            )
        if self.skipped_steps >= self.cfg.run.max_skipped_steps:
            self._raise_nonfinite(
                f"{where}; {self.skipped_steps} steps skipped already "
                f"(run.max_skipped_steps={self.cfg.run.max_skipped_steps})"
            )
        self.skipped_steps += 1
        self.log.info(f"skipping step: {where}")
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _check(self) -> None:
        """A check point (every ``run.check_every`` steps, at the end of an epoch, before a
        checkpoint): stop on a recorded non-finite step; under DDP also agree on stopping."""
        if self.cfg.run.nonfinite == "skip":
            return  # decided in every step
        if self._agree(self._watch.flag()):
            found = self._watch.first()
            self._raise_nonfinite(self._describe_nonfinite(found, here=found is not None))

    def _agree(self, bad_here: Tensor) -> bool:
        """Is any rank's flag set? One host read; under DDP one all-reduce that also decides,
        for every rank alike, whether a stop signal arrived anywhere (``_stop_everywhere``)."""
        if self.world_size == 1:
            return bool(bad_here)
        stop = torch.full((), float(self._stop_signal is not None), device=self.device)
        flags = D.all_reduce_max(torch.stack([bad_here.float(), stop])).tolist()
        self._stop_everywhere = flags[1] > 0
        return flags[0] > 0

    def _describe_nonfinite(self, found: NonFinite | None, here: bool) -> str:
        if found is None or not here:
            return f"non-finite loss on another rank (found by rank {self.rank}'s check)"
        loss = found.values.get("loss", float("nan"))
        terms = ", ".join(f"{k}={v:.4g}" for k, v in found.values.items() if k != "loss")
        epoch, step = divmod(found.global_step, self.steps_per_epoch)
        return (
            f"non-finite loss {loss:.4g} at epoch {epoch + 1}, step {step + 1} "
            f"(global step {found.global_step}); terms: {terms}"
        )

    def _weights_finite(self) -> bool:
        """Are all model parameters finite? (one host read; only asked after a bad step)"""
        checks = [torch.isfinite(p).all() for p in self.model.parameters()]
        return bool(torch.stack(checks).all()) if checks else True

    def _raise_nonfinite(self, where: str) -> None:
        D.barrier()  # rank 0 may be writing last.pt
        last = self.run.last if self.run.last.exists() else None
        keep = f"; the last good checkpoint is {last}" if last else ""
        amp = ", turn run.amp off" if self.amp is not None else ""
        raise TrainingError(
            f"{where}{keep}; training diverged: lower train.lr, set train.grad_clip{amp} and "
            "train again (--overwrite or another run.name)"
        )

    def _check_logits(self, logits: Tensor, split: str) -> None:
        """NaN/Inf logits at evaluation: the weights diverged on steps whose loss still looked
        finite (or overflowed under run.amp). A TrainingError, before any checkpoint of them."""
        if bool(torch.isfinite(logits).all()):
            return
        skip = (
            " (run.nonfinite=skip only skips steps whose loss is NaN/Inf; it cannot undo weights "
            "that blew up on steps with a finite loss)"
            if self.cfg.run.nonfinite == "skip"
            else ""
        )
        self._raise_nonfinite(
            f"the {split} logits after epoch {self.epoch} contain NaN or Inf: the model's "
            f"weights diverged{skip}"
        )

    def evaluate_epoch(self) -> dict[str, Any]:
        row: dict[str, Any] = {}
        logits, targets = self.test_logits()
        self._check_logits(logits, "test")
        test = M.evaluate_logits(logits, targets)
        row.update({f"test_{k}": v for k, v in test.items()})
        if self.data.val_loader is not None:
            vlogits, vtargets = self.val_logits()
            self._check_logits(vlogits, "validation")
            val = M.evaluate_logits(vlogits, vtargets)
            row.update({f"val_{k}": v for k, v in val.items()})
        return row

    def test_logits(self) -> tuple[Tensor, Tensor]:
        return self._collect(self.data.test_loader)

    def val_logits(self) -> tuple[Tensor, Tensor]:
        return self._collect(self.data.val_loader)

    def _collect(self, loader: Any) -> tuple[Tensor, Tensor]:
        """Logits and targets of a whole evaluation split (in sample-index order under DDP)."""
        if self.world_size == 1:
            return collect_logits(
                self.eval_model,
                loader,
                self.data.transform,
                self.device,
                self.amp,
                self.channels_last,
            )
        return collect_logits_distributed(
            self.eval_model,
            loader,
            self.data.transform,
            self.device,
            self.amp,
            self.channels_last,
        )

    def _update_best(self, row: dict[str, Any]) -> None:
        name = self.cfg.run.best_metric
        split = "val" if f"val_{name}" in row else "test"
        value = row.get(f"{split}_{name}")
        if value is None:
            if not any(k.startswith("test_") for k in row):
                return  # no evaluation this epoch
            known = sorted(k[5:] for k in row if k.startswith("test_"))
            raise ConfigError(
                f"run.best_metric {name!r} is not a metric; choose one of {', '.join(known)}"
            )
        lower = M.LOWER_IS_BETTER.get(name, True)
        better = self.best_value is None or (
            value < self.best_value if lower else value > self.best_value
        )
        if better:
            self.best_value = float(value)
            self.best_epoch = self.epoch

    def _log_row(self, row: dict[str, Any]) -> None:
        keys = [
            "train_loss",
            "train_top1_err",
            "test_top1_err",
            "test_nll",
            "test_ece",
            "val_top1_err",
        ]
        parts = [f"{k}={row[k]:.4g}" for k in keys if isinstance(row.get(k), float)]
        self.log.info(
            f"epoch {row['epoch']}/{self.cfg.train.epochs} lr={row['lr']:.4g} "
            f"{' '.join(parts)} ({row['train_seconds']:.1f}s)"
        )

    def finalize(self) -> dict[str, Any]:
        """Final metrics of the last epoch, with temperature scaling fitted on the val split."""
        logits, targets = self.test_logits()
        self._check_logits(logits, "test")
        temperature = None
        if self.data.val_loader is not None:
            vlogits, vtargets = self.val_logits()
            self._check_logits(vlogits, "validation")
            temperature = M.fit_temperature(vlogits, vtargets)
        test = M.evaluate_logits(logits, targets, temperature=temperature)
        final: dict[str, Any] = {
            "status": "finished",
            "run": str(self.run.path),
            "method": self.method.name,
            "model": self.cfg.model.name,
            "dataset": self.cfg.data.name,
            "seed": self.cfg.run.seed,
            "epochs": self.cfg.train.epochs,
            **{f"test_{k}": v for k, v in test.items()},
            "best_epoch": self.best_epoch,
            "best_metric": self.cfg.run.best_metric,
            "best_value": self.best_value,
            "parameters": count_parameters(self.model),
            "train_seconds": self.train_seconds,
            "sec_per_iter": self.train_seconds / max(1, self.global_step),
            "peak_memory_mb": peak_memory_mb(self.device),
            "skipped_steps": self.skipped_steps,
            "device": str(self.device),
            **self.run_meta,
            **ckpt.versions(),
        }
        if self.is_main:
            self.run.write_final(final)
            self.trackers.log_final(final, self.cfg.train.epochs)
        self.log.info(
            f"finished: test top-1 error {test['top1_err']:.2f}%, NLL {test['nll']:.4f}, "
            f"ECE {test['ece']:.2f}%"
            + (
                f", after temperature scaling (T={temperature:.3f}) ECE {test['ece_ts']:.2f}%"
                if temperature is not None
                else ""
            )
        )
        return final
