"""Distributed data-parallel helpers: torchrun detection, process group, vectorized collectives.

``selfkd train`` run by ``torchrun --nproc_per_node=N`` (or any launcher that sets the torchrun
variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) trains with
PyTorch DDP: :func:`init_distributed` joins the process group (NCCL on CUDA, device
``cuda:LOCAL_RANK``; gloo on the CPU) once per process; later trainers in the same process (phase 1,
then phase 2) reuse it. Without those variables (or with ``WORLD_SIZE=1``) everything here is a
no-op and single-process code paths are unchanged.

The collectives are vectorized: :func:`all_gather_rows` moves a batch of (index, row) pairs of
every rank in one ``all_gather`` of a padded tensor (plus one of the row counts), never a Python
loop over rows; :func:`reduce_grads` averages a module's gradients and floating-point buffers in
one ``all_reduce`` of a flat buffer.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from selfkd.errors import ConfigError

__all__ = [
    "DistEnv",
    "all_gather_object",
    "all_gather_rows",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_module",
    "broadcast_object",
    "env_world_size",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main",
    "main_first",
    "reduce_grads",
    "sync_buffers",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and logs."""
    return get_rank() == 0


def init_distributed(device_spec: str = "auto") -> tuple[DistEnv, torch.device | None]:
    """Join the torchrun process group if the environment asks for one.

    Returns the :class:`DistEnv` and, under DDP, this rank's device (``cuda:LOCAL_RANK`` with
    NCCL when ``device_spec`` is ``auto``/``cuda`` and CUDA is available; the CPU with gloo
    otherwise; None in a single process: the caller resolves ``run.device`` as usual). A group
    initialized by the caller (Python API) is reused as it is.
    """
    world = env_world_size()
    if not is_distributed() and world <= 1:
        return DistEnv(), None
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local_rank = _env_int("LOCAL_RANK", 0)
    spec = str(device_spec)
    want_cuda = spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available())
    if spec.startswith("mps"):
        raise ConfigError("distributed training supports run.device cpu, cuda or auto, not mps")
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError(f"run.device is {spec!r} but CUDA is not available on this node")
    if not is_distributed():
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ConfigError(
                    f"WORLD_SIZE={world} but {name} is not set; launch with torchrun "
                    "(e.g. torchrun --standalone --nproc_per_node=2 -m selfkd train -c CONFIG)"
                )
        backend = "nccl" if want_cuda else "gloo"
        if want_cuda:
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(
                    f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible; "
                    "use --nproc_per_node <= the number of GPUs"
                )
            torch.cuda.set_device(local_rank)
        kwargs: dict[str, Any] = {"backend": backend}
        if want_cuda:
            kwargs["device_id"] = torch.device("cuda", local_rank)
        timeout = os.environ.get("SELFKD_DIST_TIMEOUT_MIN")
        if timeout:
            kwargs["timeout"] = datetime.timedelta(minutes=float(timeout))
        dist.init_process_group(**kwargs)
        atexit.register(_destroy)
    backend = str(dist.get_backend())
    env = DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    if backend == "nccl":
        return env, torch.device("cuda", torch.cuda.current_device())
    return env, torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")


def _destroy() -> None:
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. creates a folder), the others after it."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def _comm_device(tensor: Tensor | None = None) -> torch.device:
    """The device collectives of the current backend need (CUDA for NCCL, CPU for gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: Tensor, op: Any) -> Tensor:
    """``tensor`` reduced with ``op`` over ranks (a new tensor on ``tensor``'s device)."""
    if not is_distributed():
        return tensor.clone()
    buf = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf, op=op)
    return buf.to(tensor.device)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over ranks (a new tensor on ``tensor``'s device)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: Tensor) -> Tensor:
    """Element-wise maximum of ``tensor`` over ranks (a new tensor on ``tensor``'s device)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; small ones only)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects; small ones only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _all_gather_flat(out: Tensor, tensor: Tensor) -> None:
    """All-gather equal-sized tensors into one (``all_gather_single`` where this torch has it)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor)


def all_gather_rows(indices: Tensor, rows: Tensor, cap: int | None = None) -> tuple[Tensor, Tensor]:
    """All ranks' ``(indices, rows)`` concatenated in rank order, on every rank.

    ``indices`` is a 1-d integer tensor and ``rows`` a B×K tensor with the same B; B may differ
    between ranks. One flat all-gather of a byte tensor padded to ``cap`` rows, each row holding
    its int64 index and its values as float32, reinterpreted as bytes (exact: nothing is
    converted but ``rows`` to float32). Rows come back as float32 on ``rows``' device.

    ``cap`` (a bound on every rank's B known to the host, e.g. the per-process batch size): each
    rank pads with copies of its own last row, and the result keeps the padding, so there is no
    host read at all; a repeated (index, row) pair changes nothing for a bank update, which keeps
    the last occurrence of an index. Without ``cap`` (or when a rank has no rows) the row counts
    are all-gathered first, read on the host, and the padding removed. This is the ``gather``
    hook of :meth:`selfkd.banks.PredictionBank.update`.
    """
    if not is_distributed():
        return indices, rows
    if rows.dim() != 2 or indices.reshape(-1).numel() != rows.shape[0]:
        raise ValueError(
            f"all_gather_rows needs B indices and B×K rows, got {tuple(indices.shape)} and "
            f"{tuple(rows.shape)}"
        )
    world = dist.get_world_size()
    device = _comm_device()
    n, k = rows.shape
    if cap is not None and 0 < n <= cap:
        return _all_gather_padded(indices, rows, cap, world, device)
    counts = torch.tensor([n], dtype=torch.int64, device=device)
    all_counts = torch.empty(world, dtype=torch.int64, device=device)
    _all_gather_flat(all_counts, counts)
    cap = int(all_counts.max())
    width = 8 + 4 * k  # bytes per row: the int64 index, then K float32 values
    packed = torch.zeros(cap, width, dtype=torch.uint8, device=device)
    if n:
        packed[:n] = _pack_rows(indices, rows, device)
    out = torch.empty(world * cap, width, dtype=torch.uint8, device=device)
    _all_gather_flat(out, packed)
    # keep the first count_r rows of each rank's block (a vectorized mask, no loop over rows)
    position = torch.arange(cap, device=device).repeat(world)
    keep = position < all_counts.repeat_interleave(cap)
    out_idx, out_rows = _unpack_rows(out[keep])
    return out_idx.to(indices.device), out_rows.to(rows.device)


def _pack_rows(indices: Tensor, rows: Tensor, device: torch.device) -> Tensor:
    """n×(8 + 4K) bytes: each row's int64 index, then its values as float32."""
    n, k = rows.shape
    idx = indices.reshape(-1).to(device=device, dtype=torch.int64).contiguous()
    vals = rows.detach().to(device=device, dtype=torch.float32).contiguous()
    return torch.cat(
        [idx.view(torch.uint8).reshape(n, 8), vals.view(torch.uint8).reshape(n, 4 * k)], 1
    )


def _unpack_rows(packed: Tensor) -> tuple[Tensor, Tensor]:
    out_idx = packed[:, :8].contiguous().view(torch.int64).reshape(-1)
    return out_idx, packed[:, 8:].contiguous().view(torch.float32)


def _all_gather_padded(
    indices: Tensor, rows: Tensor, cap: int, world: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """:func:`all_gather_rows` with every rank padded to ``cap`` by repeating its last row."""
    n = rows.shape[0]
    packed = _pack_rows(indices, rows, device)
    if n < cap:
        packed = torch.cat([packed, packed[-1:].expand(cap - n, -1)])
    out = torch.empty(world * cap, packed.shape[1], dtype=torch.uint8, device=device)
    _all_gather_flat(out, packed.contiguous())
    out_idx, out_rows = _unpack_rows(out)
    return out_idx.to(indices.device), out_rows.to(rows.device)


def _flat_state(module: nn.Module, grads: bool) -> list[Tensor]:
    if grads:
        return [p for p in module.parameters() if p.requires_grad]
    return [b for b in module.buffers() if b.is_floating_point()]


def reduce_grads(module: nn.Module, active: bool = True) -> bool:
    """Average ``module``'s gradients and floating-point buffers over the active ranks.

    For a module trained by a method's own optimizer (AI-KD's critic): call it after
    ``backward`` and before ``optimizer.step()`` on every rank, so every replica takes the same
    step. A rank without data for this step passes ``active=False``: it contributes nothing
    and receives the others' average. Floating-point buffers (BatchNorm running statistics,
    updated by each rank's forward) are averaged the same way, so the replicas stay identical.
    One ``all_reduce`` of a flat buffer. Returns False when no rank was active (then skip the
    optimizer step). In a single process: returns ``active`` and changes nothing.
    """
    if not is_distributed():
        return active
    params = _flat_state(module, grads=True)
    buffers = _flat_state(module, grads=False)
    device = _comm_device()
    weight = 1.0 if active else 0.0
    pieces = []
    for p in params:
        g = p.grad if (active and p.grad is not None) else torch.zeros_like(p)
        pieces.append(g.detach().reshape(-1).float().to(device) * weight)
    for b in buffers:
        pieces.append(b.detach().reshape(-1).float().to(device) * weight)
    pieces.append(torch.tensor([weight], device=device))
    flat = torch.cat(pieces)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    total = flat[-1:]
    # an active rank knows some rank was active: it divides on the device, no host read; only an
    # inactive rank (no data this step, rare) reads whether anyone was
    if not active and float(total) == 0:
        return False
    flat = flat[:-1] / total
    offset = 0
    for p in params:
        n = p.numel()
        value = flat[offset : offset + n].view_as(p).to(p.device, p.dtype)
        if p.grad is None:
            p.grad = value.clone()
        else:
            p.grad.copy_(value)
        offset += n
    with torch.no_grad():
        for b in buffers:
            n = b.numel()
            b.copy_(flat[offset : offset + n].view_as(b).to(b.device, b.dtype))
            offset += n
    return True


@torch.no_grad()
def sync_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over ranks.

    Each rank's BatchNorm running statistics follow its own shard; averaging them (one
    ``all_reduce``) makes the replicas identical before evaluation and checkpoints.
    Integer buffers (``num_batches_tracked``) advance alike on every rank and are left alone.
    """
    if not is_distributed():
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    device = _comm_device()
    flat = torch.cat([b.reshape(-1).float().to(device) for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for b in buffers:
        n = b.numel()
        b.copy_(flat[offset : offset + n].view_as(b).to(b.device, b.dtype))
        offset += n


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters into every rank's ``module`` (one broadcast each)."""
    if not is_distributed():
        return
    tensors = list(module.parameters())
    device = _comm_device()
    for t in tensors:
        buf = t.detach().to(device, copy=True)
        dist.broadcast(buf, src=src)
        t.copy_(buf.to(t.device))
