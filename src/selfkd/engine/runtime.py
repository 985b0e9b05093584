"""Where and how a run executes: threads, process group, device, precision, the per-process
batch, and the model's wrappers (SyncBatchNorm, channels-last, DistributedDataParallel,
``torch.compile``). The trainer asks this module once, at construction."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from selfkd.config import Config
from selfkd.engine import distributed as D
from selfkd.engine.device import (
    amp_dtype,
    channels_last_allowed,
    compile_options,
    resolve_device,
    seed_everything,
)
from selfkd.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run."""

    dist: D.DistEnv
    device: torch.device
    #: autocast dtype (run.amp), None for float32
    amp: torch.dtype | None
    #: samples per step on this process (data.batch_size is the global batch)
    batch_size: int
    #: run.sync_bn in effect (only with more than one process)
    sync_bn: bool

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size


def start(cfg: Config) -> Runtime:
    """Join the process group (under torchrun), pick the device and precision, seed every
    generator with ``run.seed``, and check the batch and sync-BN settings against them."""
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    dist, dist_device = D.init_distributed(cfg.run.device)
    device = dist_device if dist_device is not None else resolve_device(cfg.run.device)
    amp = amp_dtype(cfg.run.amp, device)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    world = dist.world_size
    if cfg.data.batch_size % world:
        raise ConfigError(
            f"data.batch_size {cfg.data.batch_size} is the global batch and must be divisible "
            f"by the {world} processes; choose a multiple of {world}"
        )
    sync_bn = bool(getattr(cfg.run, "sync_bn", False)) and world > 1
    if sync_bn and device.type != "cuda":
        raise ConfigError("run.sync_bn needs CUDA (SyncBatchNorm has no CPU kernel)")
    return Runtime(dist, device, amp, cfg.data.batch_size // world, sync_bn)


def place(model: nn.Module, runtime: Runtime) -> nn.Module:
    """``model`` on the device (with SyncBatchNorm under run.sync_bn)."""
    if runtime.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(runtime.device)


def set_channels_last(
    requested: bool, runtime: Runtime, model: nn.Module, *others: nn.Module
) -> bool:
    """Make ``model`` channels-last when run.channels_last asks and the CPU's kernels get it
    right for these modules (:func:`~selfkd.engine.device.channels_last_allowed`)."""
    allowed = channels_last_allowed(requested, runtime.device, (model, *others))
    if allowed:
        model.to(memory_format=torch.channels_last)
    return allowed


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP keyword that keeps buffers rank-local between epochs (the name changed in torch)."""
    from torch.nn.parallel import DistributedDataParallel

    names = inspect.signature(DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in names:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def wrap(
    model: nn.Module, runtime: Runtime, compile: bool, others: tuple[nn.Module, ...] = ()
) -> tuple[nn.Module | None, nn.Module, nn.Module]:
    """The models the loop runs: ``(ddp_model, forward_model, eval_model)``.

    Under DDP the training forward goes through ``DistributedDataParallel`` (gradients averaged
    during backward; buffers stay rank-local, averaged at epoch ends); evaluation runs the bare
    model. With run.compile both are compiled (``others``: modules whose layout matters too).
    """
    ddp_model = None
    if runtime.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        ddp_model = DistributedDataParallel(
            model,
            device_ids=ids,
            output_device=ids[0] if ids else None,
            **_no_forward_buffer_sync(),
        )
    forward_model: nn.Module = ddp_model or model
    eval_model: nn.Module = model
    if compile:
        # methods read features through forward hooks (selfkd.models.taps); by default dynamo
        # does not guard on hooks, so code compiled earlier in this process for the same model
        # class (a sweep's previous run, phase 1) would run without them
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        options = compile_options(runtime.device, (model, *others))
        forward_model = torch.compile(forward_model, **options)
        eval_model = forward_model if ddp_model is None else torch.compile(model, **options)
    return ddp_model, forward_model, eval_model
