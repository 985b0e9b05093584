"""The training loop. It knows nothing about any particular method.

Per step (:meth:`Trainer.train_step`): move the batch to the device, augment it there (then
``data.mix``: Cutout, Mixup or CutMix, on half the batch for methods whose ``mixing`` is
"split"), ask the method for a loss (:meth:`Method.training_step`), back-propagate (with a
gradient scaler under fp16), clip, step the optimizer, and let the method update its state
(:meth:`Method.after_optimizer_step`). Per epoch (:meth:`Trainer.train_epoch`, then
:meth:`Trainer.fit`): evaluate on the test split (and the held-out validation split when there
is one), append a metrics row, write ``last.pt`` (and ``best.pt``) atomically. The data order
of every epoch is a function of (seed, epoch), so a resumed run sees exactly the batches it
would have seen.

What the loop leaves to modules of its own:

- :mod:`~selfkd.engine.runtime`: threads, process group, device, precision, the per-process
  batch, SyncBatchNorm, channels-last, the DDP wrapper and ``torch.compile``.
- :mod:`~selfkd.engine.state`: the progress counters, the checkpoint payload and restoring it,
  every rank's RNG streams; :mod:`~selfkd.engine.resume`: which config changes a resume allows.
- :mod:`~selfkd.engine.guard`: the non-finite policy (``run.nonfinite``), read without a host
  round-trip per step; :mod:`~selfkd.engine.signals`: SIGTERM/SIGINT stop after a step.
- :mod:`~selfkd.engine.evaluate`: logits of an evaluation split and the metrics of an epoch.
- :mod:`~selfkd.engine.meters`, :mod:`~selfkd.engine.console`, :mod:`~selfkd.engine.loggers`,
  :mod:`~selfkd.engine.rundir`: the training columns, what is printed, experiment trackers,
  the files of the run directory.

Distributed data parallel (launched by ``torchrun``; :mod:`selfkd.engine.distributed`):
``data.batch_size`` is the *global* batch; each of the ``W`` processes takes ``batch_size / W``
samples per step, and the epoch order is sharded like ``DistributedSampler``
(:class:`~selfkd.data.EpochLoader`), so one step of a W-process run sees the same global batch
as one step of a single-process run (a method's ``batch_sampler`` is asked for per-process
batches; DLB pairs each rank's consecutive batches). The model is wrapped in
``DistributedDataParallel``; gradients of the method's ``main_optimizer_modules`` are averaged
with one all-reduce after backward; BatchNorm running statistics are averaged over ranks at the
end of every epoch (``run.sync_bn: true`` converts to ``SyncBatchNorm``, CUDA only). Methods
get DDP facts and hooks through :class:`~selfkd.methods.MethodContext`; their parameters are
broadcast from rank 0 after ``setup``. Training sums are all-reduced at the end of the epoch,
evaluation logits gathered over ranks (``data.eval_batch_size`` is per process). Only rank 0
writes files and logs; on resume every rank reads ``last.pt`` (the run directory must be
visible to every rank, as on one node).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfkd.config import Config
from selfkd.data.mixing import Mixer
from selfkd.engine import checkpoint as ckpt
from selfkd.engine import distributed as D
from selfkd.engine import evaluate as E
from selfkd.engine import loggers as L
from selfkd.engine import runtime
from selfkd.engine import state as S
from selfkd.engine.build import (
    build_data,
    build_model,
    check_data,
    count_parameters,
    fresh_model,
    input_shape,
    load_compatible,
    resolve_config,
    steps_per_epoch,
)
from selfkd.engine.console import StepDisplay, start_line
from selfkd.engine.device import autocast
from selfkd.engine.guard import NonFiniteGuard
from selfkd.engine.meters import EpochMeter
from selfkd.engine.optim import build_optimizer, lr_at, set_lr
from selfkd.engine.record import RunRecord
from selfkd.engine.resume import load_for_resume
from selfkd.engine.rundir import RunDir, abandon, check_start, close_logger, open_run
from selfkd.engine.runinfo import run_metadata
from selfkd.engine.signals import StopSignals
from selfkd.errors import RunInterrupted, SelfKDError
from selfkd.methods import Batch, Method, MethodContext, StepInfo, build_method
from selfkd.methods.base import mix_split

#: called as ``callback(trainer, epoch)`` after every epoch's checkpoints are written
Callback = Callable[["Trainer", int], None]


def _abandon_on_failure(init: Callable[..., None]) -> Callable[..., None]:
    """``Trainer.__init__`` that, when it fails, releases the run directory and removes the
    folder it created (so a refused run leaves nothing behind that blocks a rerun)."""

    @functools.wraps(init)
    def wrapper(self: Trainer, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except BaseException:
            abandon(getattr(self, "run", None), getattr(self, "log", None), self._created_dir)
            raise

    return wrapper


def _progress_field(name: str, doc: str) -> property:
    """A Trainer attribute that reads and writes ``trainer.progress.<name>``."""
    return property(
        lambda self: getattr(self.progress, name),
        lambda self, value: setattr(self.progress, name, value),
        doc=doc,
    )


class Trainer:
    """Trains one model with one method under one config, in one run directory.

    ``model`` and ``data`` may be given (Python API: any ``nn.Module`` returning logits, any
    :class:`~selfkd.data.DataBundle`); otherwise they are built from the config's registries.
    """

    _created_dir = False  # set once this trainer made the run folder (removed if it fails)

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
        #: config keys a resume may change besides RESUME_MAY_CHANGE (e.g. for a phase-1 run)
        self.resume_may_change = frozenset(resume_may_change)
        self.callbacks = list(callbacks)
        self.runtime = rt = runtime.start(cfg)  # threads, processes, device, precision, seed
        self.device, self.amp, self.batch_size = rt.device, rt.amp, rt.batch_size
        self.rank, self.world_size = rt.rank, rt.world_size
        self.is_main = self.rank == 0

        self.run = RunDir(run_dir or Path(cfg.run.out_dir) / cfg.run.name)
        self._created_dir = self.is_main and not self.run.path.exists()
        # the run directory is checked before any expensive work (dataset loading); a --resume
        # of a run that stopped before its first checkpoint starts it again (restarted)
        resume, overwrite, self.restarted = check_start(self.run, resume, overwrite)
        self.resume = resume
        D.barrier()  # every rank has checked the directory before rank 0 writes into it
        #: run.loggers (csv first); a missing tracker client is refused before the data loads
        self.logger_names = L.logger_names(cfg.run)
        L.require_clients(self.logger_names)

        if data is None:
            data = build_data(cfg, batch_size=rt.batch_size, rank=rt.rank, world_size=rt.world_size)
        self.data = data
        check_data(self.data, cfg, self.world_size)  # sharding; enough classes for best_metric
        self._user_model = model is not None
        self.model = runtime.place(model if model is not None else build_model(cfg, self.data), rt)
        self.method = method if method is not None else build_method(cfg.method)
        # data.mix: refused before the run directory is touched if the method cannot take it
        self.mixer = Mixer.from_spec(cfg.data.mix_spec, image_size=input_shape(self.data)[1:])
        self.mix_split = mix_split(cfg.data.mix_spec, self.method)
        resumed = None
        if resume:  # refused before anything in the run directory changes
            resumed = load_for_resume(
                self.run,
                self.device,
                self.resolved_config(),
                self.method.name,
                self.resume_may_change,
            )
        self.log = open_run(
            self.run,
            is_main=self.is_main,
            resume=resume,
            overwrite=overwrite,
            name=cfg.run.name,
            quiet=quiet,
        )
        if self.restarted:
            self.log.info(f"{self.run.path} has no checkpoint yet: starting it from epoch 1")
        D.barrier()

        sampler = self.method.batch_sampler(self.data.train_labels, self.batch_size, cfg.run.seed)
        if sampler is not None:
            self.data.train_loader.set_batch_sampler(sampler)
        self.steps_per_epoch = steps = steps_per_epoch(self.data, cfg)
        self.method.setup(self.model, self._method_context())
        self.method.to(self.device)
        #: run.channels_last in effect (not where the CPU's kernels get it wrong: device.py)
        self.channels_last = runtime.set_channels_last(
            cfg.run.channels_last, rt, self.model, self.method
        )
        extra_modules = self.method.main_optimizer_modules()
        self.optimizer = build_optimizer([self.model, *extra_modules], cfg.train)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        #: method-owned modules trained with the model: their gradients are averaged by hand
        self._extra_modules: nn.Module | None = None
        if self.world_size > 1:
            D.broadcast_module(self.method)  # owned heads, critic: rank 0's initial weights
            if extra_modules:
                self._extra_modules = nn.ModuleList(extra_modules)

        self.state = S.TrainState(self.model, self.method, self.optimizer, self.scaler)
        self.progress = self.state.progress
        self.stop = StopSignals()
        self.record = RunRecord(self.run, self.log, self.logger_names, self.is_main)
        #: versions, git commit, host, devices, world size (config.yaml meta, final.json)
        self.run_meta = run_metadata(self.device, self.world_size)
        if self.world_size > 1:  # augmentations differ between ranks; model and method alike
            S.seed_rank(cfg.run.seed, self.rank, cfg.run.deterministic)
        if resumed is not None:
            self.state.restore(
                resumed[0],
                source=self.run.last,
                num_classes=self.data.num_classes,
                model_config=self._model_config(),
                runtime=rt,
                run_cfg=cfg.run,
            )
        self.guard = NonFiniteGuard(
            cfg.run, rt, self.model, self.progress, steps, self.stop, self.run.last, self.log.info
        )
        log_every = cfg.run.log_every if self.is_main else 0  # a line every N steps, no bar
        self.display = StepDisplay(
            cfg.run.progress, log_every, self.log.info, cfg.train.epochs, steps
        )
        # the models the loop runs: DDP averages gradients during backward; run.compile
        self.ddp_model, self.forward_model, self.eval_model = runtime.wrap(
            self.model, rt, cfg.run.compile, (self.method,)
        )
        self.evaluator = E.Evaluator(
            self.eval_model, self.data, rt, self.channels_last, check=self.guard.check_logits
        )
        if self.is_main:
            self.run.write_config({**self.resolved_config(), "meta": self.run_meta})

    # --- construction -----------------------------------------------------------------------
    def _method_context(self) -> MethodContext:
        """What the method may know of this run (its data, schedule, process and DDP hooks)."""
        return MethodContext(
            num_classes=self.data.num_classes,
            num_train=self.data.num_train,
            train_labels=self.data.train_labels,
            epochs=self.cfg.train.epochs,
            steps_per_epoch=self.steps_per_epoch,
            device=self.device,
            build_model=self._fresh_model,
            load_model=self.load_compatible_model,
            config=self.cfg.to_dict(),
            run_dir=self.run.path,
            input_shape=input_shape(self.data),
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
            mix=self.cfg.data.mix_spec,
        )

    def _fresh_model(self) -> nn.Module:
        """A new, untrained model of this run's architecture, on the device."""
        return fresh_model(
            self.cfg, self.data, self.device, self.model if self._user_model else None
        )

    def load_compatible_model(self, path: str) -> nn.Module:
        """Load a trained model (e.g. AI-KD's superior) after checking it fits this run."""
        return load_compatible(
            path,
            fresh=self._fresh_model,
            dataset=self.cfg.data.name,
            num_classes=self.data.num_classes,
            model_config=self._model_config(),
            device=self.device,
        )

    def resolved_config(self) -> dict[str, Any]:
        """The config with every default filled in; still a valid config file."""
        return resolve_config(self.cfg, self.method, self.data, self.mixer, self.mix_split)

    def _model_config(self) -> dict[str, Any] | None:
        """This run's ``model`` section (None for a model given through the Python API)."""
        return None if self._user_model else self.cfg.to_dict()["model"]

    # --- progress and checkpoints (selfkd.engine.state) -------------------------------------
    epoch = _progress_field("epoch", "Epochs finished.")
    global_step = _progress_field("global_step", "Optimizer steps taken (skipped ones too).")

    def checkpoint_payload(self) -> dict[str, Any]:
        """The checkpoint dict. Under DDP every rank must call it (it gathers the RNG states)."""
        name = self.cfg.model.name if not self._user_model else type(self.model).__name__
        meta = S.checkpoint_meta(
            self.resolved_config(), self.model, name, self.cfg.data.name, self.data
        )
        return self.state.payload(meta, self.world_size)

    def save_last(self) -> None:
        """Write checkpoints/last.pt atomically, keeping the one it replaces as last.prev.pt.

        Under DDP every rank calls it (the payload gathers every rank's RNG state); rank 0 writes.
        """
        self._save(self.run.last, self.run.last_previous)

    def _save(self, path: Path, keep_previous: Path | None = None) -> None:
        self.guard.before_saving(path)
        payload = self.checkpoint_payload()
        if self.is_main:
            ckpt.save_checkpoint(path, payload, keep_previous)

    # --- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``train.epochs`` (continuing after a resume); return the final metrics."""
        cfg = self.cfg
        status = "interrupted"  # for the trackers: finished, failed or interrupted
        try:
            self.stop.install()
            resolved = {**self.resolved_config(), "meta": self.run_meta}
            self.record.start(cfg, resolved, self.resume)
            self.log.info(start_line(self))
            while self.epoch < cfg.train.epochs:
                row = self.train_epoch(self.epoch)
                self.epoch += 1
                if self.epoch % cfg.run.eval_every == 0 or self.epoch == cfg.train.epochs:
                    row.update(self.evaluate_epoch())
                self.record.epoch(row, cfg.train.epochs)
                self._update_best(row)  # before last.pt: the checkpoint holds the best so far
                self.save_last()
                if self.progress.best_epoch == self.epoch:
                    self._save(self.run.best)
                for callback in self.callbacks:
                    callback(self, self.epoch)
            final = self.finalize()
            status = "finished"
        except (SelfKDError, RuntimeError, ValueError, OSError) as exc:
            status = "interrupted" if isinstance(exc, RunInterrupted) else "failed"
            if status == "failed":  # final.json says so (reports list it); resuming still works
                facts = {"epoch": self.epoch, "global_step": self.global_step}
                facts |= {"method": self.method.name, "seed": cfg.run.seed, **self.run_meta}
                self.record.failed(exc, facts)
            raise
        finally:
            self.stop.uninstall()
            self.record.close(status)
            close_logger(self.log)
            if self.is_main:
                self.run.clean_temporaries()  # still under the lock
            self.run.release()
        return final

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch (from ``progress.step_in_epoch`` when resuming mid-epoch)."""
        self.model.train()
        self.method.train()
        first = self.progress.step_in_epoch
        if first == 0:
            self.method.on_epoch_start(self.model, epoch)
        meter = EpochMeter(self.device, self.progress.partial)
        self.progress.partial = None
        loader = self.data.train_loader
        self.display.open(epoch, first, meter.start)
        checked = True
        for step, (x, y, idx) in enumerate(loader.iterate(epoch, first), start=first):
            result = self.train_step(x, y, idx, epoch, step)
            self.global_step += 1
            self.progress.step_in_epoch = step + 1
            last = step == self.steps_per_epoch - 1
            checked = self.global_step % self.cfg.run.check_every == 0 or last
            if checked:
                self._check()
            if result is not None:  # None: a skipped non-finite step
                out, loss, lr = result
                meter.add(out, loss)
                self.display.step(step, loss, lr, checked)
            self._stop_if_asked(epoch, meter)
        self.display.close()
        if not checked:
            self._check()  # an epoch ends checked: its checkpoint never holds diverged weights
        self.progress.step_in_epoch = 0
        if self.world_size > 1:
            D.sync_buffers(self.model)  # BatchNorm running statistics: the mean over ranks
            meter.reduce()
        self.method.on_epoch_end(self.forward_model, epoch)
        if getattr(loader, "epoch_skipped", 0):
            self.log.info(
                f"epoch {epoch + 1}: skipped {loader.epoch_skipped} corrupt image(s), "
                f"{loader.skipped} in all (data.skip_corrupt)"
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = meter.seconds()
        self.progress.train_seconds += seconds
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr_at(self.cfg.train, self.global_step - 1, self.steps_per_epoch),
            **meter.row(),
            "train_seconds": seconds,
            "sec_per_iter": seconds / max(1, self.steps_per_epoch),
        }
        if self.progress.skipped_steps:
            row["skipped_steps"] = self.progress.skipped_steps
        if getattr(loader, "skipped", 0):
            row["skipped_images"] = loader.skipped
        return row

    def train_step(
        self, x: Tensor, y: Tensor, idx: Tensor, epoch: int, step: int
    ) -> tuple[Any, Tensor, float] | None:
        """One optimizer step on a CPU batch; returns (StepOutput, loss, lr) or None if skipped.

        Does not advance ``global_step`` (the caller does), so benchmarks can call it directly.
        """
        cfg = self.cfg
        batch = self._batch(x, y, idx)
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
        skip = self.guard.skip(loss, out.terms, info.global_step)  # run.nonfinite: skip
        self.optimizer.zero_grad(set_to_none=True)
        if skip:
            return None
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

    def _batch(self, x: Tensor, y: Tensor, idx: Tensor) -> Batch:
        """A CPU batch on the device, augmented there (then mixed under data.mix)."""
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
        return Batch(
            inputs=inputs,
            targets=targets,
            indices=indices,
            raw=raw,
            augment=transform.train,
            mix=mix,
        )

    def _check(self) -> None:
        """A check point: stop on a recorded non-finite step (selfkd.engine.guard)."""
        self.guard.check()

    def _stop_if_asked(self, epoch: int, meter: EpochMeter) -> None:
        """After a step: if a signal arrived, write a mid-epoch checkpoint and stop.

        Under DDP the decision is the same on every rank (made at a check point): a signal on
        any rank stops all of them after the same step.
        """
        if not self.stop.asked(self.world_size > 1):
            return
        if self.world_size == 1:
            self._check()  # never checkpoint weights a non-finite step has touched
        else:
            # BatchNorm running statistics are linear in their updates: averaging them now or at
            # the end of the epoch gives the same result, and the checkpoint holds every rank's
            D.sync_buffers(self.model)
            meter.reduce()
        self.progress.partial = meter.partial()
        self.save_last()
        message = (
            f"stopped by {self.stop.name} at epoch {epoch + 1}, step "
            f"{self.progress.step_in_epoch}/{self.steps_per_epoch}; saved {self.run.last}; "
            "continue with --resume"
        )
        self.log.info(message)
        raise RunInterrupted(message, self.stop.number)

    # --- evaluation (selfkd.engine.evaluate) ------------------------------------------------
    def evaluate_epoch(self) -> dict[str, Any]:
        """The test (and validation) columns of this epoch's metrics row."""
        return E.epoch_metrics(*self.evaluator.splits())

    def test_logits(self) -> tuple[Tensor, Tensor]:
        return self.evaluator.logits(self.data.test_loader)

    def val_logits(self) -> tuple[Tensor, Tensor]:
        return self.evaluator.logits(self.data.val_loader)

    def _update_best(self, row: dict[str, Any]) -> None:
        """This epoch becomes the best one when its run.best_metric improves on the best."""
        value = E.improved_value(row, self.cfg.run.best_metric, self.progress.best_value)
        if value is not None:
            self.progress.best_value, self.progress.best_epoch = value, self.epoch

    # --- what the run reports ---------------------------------------------------------------
    def finalize(self) -> dict[str, Any]:
        """Final metrics of the last epoch, with temperature scaling fitted on the val split."""
        test, temperature = E.final_metrics(*self.evaluator.splits())
        return self.record.finished(
            self.cfg,
            self.method.name,
            test,
            temperature,
            self.progress,
            parameters=count_parameters(self.model),
            device=self.device,
            meta=self.run_meta,
        )
