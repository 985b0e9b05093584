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
"""

from __future__ import annotations

import copy
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfkd import metrics as M
from selfkd.config import Config
from selfkd.data.mixing import Mixer
from selfkd.engine import checkpoint as ckpt
from selfkd.engine.device import (
    amp_dtype,
    autocast,
    peak_memory_mb,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from selfkd.engine.optim import build_optimizer, lr_at, set_lr
from selfkd.engine.rundir import RunDir, close_logger
from selfkd.errors import CheckpointError, ConfigError, RunInterrupted, TrainingError
from selfkd.methods import Batch, Method, MethodContext, StepInfo, build_method

Callback = Callable[["Trainer", int], None]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def wants_progress_bar(mode: str) -> bool:
    if mode == "bar":
        return True
    if mode == "off":
        return False
    return sys.stderr.isatty() and not os.environ.get("CI")


@torch.no_grad()
def collect_logits(
    model: nn.Module,
    loader: Any,
    transform: Any,
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` in eval mode over ``loader``; return float32 CPU logits and targets."""
    was_training = model.training
    model.eval()
    outs, targets = [], []
    for x, y, _ in loader.iterate(0):
        x = transform.eval(x.to(device, non_blocking=True))
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = model(x)
        outs.append(logits.float().cpu())
        targets.append(y.cpu())
    model.train(was_training)
    return torch.cat(outs), torch.cat(targets)


class Trainer:
    """Trains one model with one method under one config, in one run directory.

    ``model`` and ``data`` may be given (Python API: any ``nn.Module`` returning logits, any
    :class:`~selfkd.data.DataBundle`); otherwise they are built from the config's registries.
    """

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
    ) -> None:
        self.cfg = cfg
        self.resume = resume
        self.callbacks = list(callbacks)
        if cfg.run.threads is not None:
            torch.set_num_threads(cfg.run.threads)
        self.device = resolve_device(cfg.run.device)
        self.amp = amp_dtype(cfg.run.amp, self.device)
        seed_everything(cfg.run.seed, cfg.run.deterministic)

        self.run = RunDir(run_dir or Path(cfg.run.out_dir) / cfg.run.name)
        # Check the run directory before any expensive work (dataset loading).
        if self.run.holds_run() and not (resume or overwrite):
            self.run.prepare(resume=False, overwrite=False)  # raises RunDirError
        if resume and not self.run.has_checkpoint():
            raise CheckpointError(
                f"nothing to resume in {self.run.path}: {self.run.last} does not exist; "
                "drop --resume to start a new run"
            )

        self.data = data if data is not None else self._build_data()
        self._user_model = model is not None
        self.model = model if model is not None else self._build_model()
        self.model.to(self.device)
        if cfg.run.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.method = method if method is not None else build_method(cfg.method)
        # data.mix: refused before the run directory is touched if the method cannot take it
        self.mixer = Mixer.from_config(cfg.data.mix, image_size=self._input_shape()[1:])
        self.mix_split = (
            self.mixer.split_for(self.method.name, self.method.mixing)
            if self.mixer is not None
            else False
        )
        self.run.prepare(resume=resume, overwrite=overwrite)
        self.log = self.run.logger(cfg.run.name, quiet=quiet)

        sampler = self.method.batch_sampler(
            self.data.train_labels, cfg.data.batch_size, cfg.run.seed
        )
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
        )
        self.method.setup(self.model, ctx)
        self.method.to(self.device)
        modules = [self.model, *self.method.main_optimizer_modules()]
        self.optimizer = build_optimizer(modules, cfg.train)
        use_scaler = self.amp == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.forward_model: nn.Module = self.model
        if cfg.run.compile:
            self.forward_model = torch.compile(self.model)

        self.epoch = 0
        self.step_in_epoch = 0  # > 0 only while resuming in the middle of an epoch
        self._partial: dict[str, Any] | None = None
        self._stop_signal: int | None = None
        self.global_step = 0
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.skipped_steps = 0
        self.train_seconds = 0.0
        self.tb = self._tensorboard() if cfg.run.tensorboard else None
        if resume:
            state, self._resumed_from = ckpt.load_latest(
                self.run.last, self.run.last_previous, map_location=self.device
            )
            self._restore(state)
        self.run.write_config(self.resolved_config())

    # --- construction -----------------------------------------------------------------------
    def _build_data(self) -> Any:
        from selfkd.data import build_data

        d = self.cfg.data
        return build_data(
            name=d.name,
            root=d.root,
            batch_size=d.batch_size,
            eval_batch_size=d.eval_batch_size,
            per_class=d.per_class,
            val_size=d.val_size,
            split_seed=d.split_seed,
            seed=self.cfg.run.seed,
            workers=d.workers,
            augment=d.augment,
            normalize=d.normalize,
            options=d.options,
            drop_last=d.drop_last,
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
        ckpt.check_compatible(meta, model, self.data.num_classes, f"checkpoint {path}")
        model.load_state_dict(data["model"])
        return model

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self_warn = (
                "run.tensorboard=true but tensorboard is not installed; pip install tensorboard"
            )
            import warnings

            warnings.warn(self_warn, stacklevel=2)
            return None
        return SummaryWriter(str(self.run.path / "tensorboard"))

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
        return {
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
        """Write checkpoints/last.pt atomically, keeping the one it replaces as last.prev.pt."""
        ckpt.save_checkpoint(self.run.last, self.checkpoint_payload(), self.run.last_previous)

    def _restore(self, data: dict[str, Any]) -> None:
        meta = data.get("meta", {})
        ckpt.check_compatible(
            meta, self.model, self.data.num_classes, f"checkpoint {self.run.last}"
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
        set_rng_state(data["rng"])
        progress = data["progress"]
        self.epoch = int(progress["epoch"])
        self.step_in_epoch = int(progress.get("step_in_epoch", 0))
        self._partial = progress.get("partial")
        self.global_step = int(progress["global_step"])
        self.best_value = progress.get("best_value")
        self.best_epoch = progress.get("best_epoch")
        self.skipped_steps = int(progress.get("skipped_steps", 0))
        self.train_seconds = float(progress.get("train_seconds", 0.0))

    # --- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``train.epochs`` (continuing after a resume); return the final metrics."""
        cfg = self.cfg
        try:
            self._install_signal_handlers()
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
                self.run.append_row(row)
                self._log_row(row)
                self._update_best(row)
                self.save_last()
                if self.best_epoch == self.epoch:
                    ckpt.save_checkpoint(self.run.best, self.checkpoint_payload())
                for callback in self.callbacks:
                    callback(self, self.epoch)
            final = self.finalize()
        finally:
            self._restore_signal_handlers()
            if self.tb is not None:
                self.tb.close()
            close_logger(self.log)
        return final

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
        """After a step: if a signal arrived, write a mid-epoch checkpoint and stop."""
        if self._stop_signal is None:
            return
        signum = self._stop_signal
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
        for step, (x, y, idx) in enumerate(loader.iterate(epoch, first), start=first):
            result = self.train_step(x, y, idx, epoch, step)
            self.global_step += 1
            self.step_in_epoch = step + 1
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
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.4g}")
            self._stop_if_asked(epoch, sums, seen, wrong, start)
        if bar is not None:
            bar.close()
        self.step_in_epoch = 0
        self.method.on_epoch_end(self.forward_model, epoch)
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
        return row

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
        if cfg.run.channels_last and inputs.dim() == 4:
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
        if not bool(torch.isfinite(loss)):
            self._nonfinite(out, info)
            return None
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.train.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_optimizer_step(self.forward_model, batch, out)
        return out, loss, lr

    def _nonfinite(self, out: Any, info: StepInfo) -> None:
        terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in out.terms.items())
        where = (
            f"non-finite loss {float(out.loss.detach()):.4g} at epoch {info.epoch + 1}, "
            f"step {info.step + 1} (global step {info.global_step}); terms: {terms}"
        )
        if self.cfg.run.nonfinite == "skip" and self.skipped_steps < self.cfg.run.max_skipped_steps:
            self.skipped_steps += 1
            self.log.info(f"skipping step: {where}")
            self.optimizer.zero_grad(set_to_none=True)
            return
        last = self.run.last if self.run.last.exists() else None
        keep = f"; the last good checkpoint is {last}" if last else ""
        raise TrainingError(f"{where}{keep}; lower train.lr or set train.grad_clip")

    def evaluate_epoch(self) -> dict[str, Any]:
        row: dict[str, Any] = {}
        logits, targets = self.test_logits()
        test = M.evaluate_logits(logits, targets)
        row.update({f"test_{k}": v for k, v in test.items()})
        if self.data.val_loader is not None:
            vlogits, vtargets = self.val_logits()
            val = M.evaluate_logits(vlogits, vtargets)
            row.update({f"val_{k}": v for k, v in val.items()})
        return row

    def test_logits(self) -> tuple[Tensor, Tensor]:
        return collect_logits(
            self.forward_model,
            self.data.test_loader,
            self.data.transform,
            self.device,
            self.amp,
            self.cfg.run.channels_last,
        )

    def val_logits(self) -> tuple[Tensor, Tensor]:
        return collect_logits(
            self.forward_model,
            self.data.val_loader,
            self.data.transform,
            self.device,
            self.amp,
            self.cfg.run.channels_last,
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
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch" and math.isfinite(value):
                    self.tb.add_scalar(key.replace("_", "/", 1), value, row["epoch"])

    def finalize(self) -> dict[str, Any]:
        """Final metrics of the last epoch, with temperature scaling fitted on the val split."""
        logits, targets = self.test_logits()
        temperature = None
        if self.data.val_loader is not None:
            vlogits, vtargets = self.val_logits()
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
            **ckpt.versions(),
        }
        self.run.write_final(final)
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
