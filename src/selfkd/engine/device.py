"""Device choice, seeding, determinism, mixed precision, and the speed flags' CPU guards."""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from selfkd.engine.cpu import (
    channels_last_refusal,
    isolate_compile_cache,
    native_bf16,
    onednn_tier,
)
from selfkd.errors import ConfigError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; anything else must be available."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"run.device {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device is {spec!r} but CUDA is not available; use run.device=auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"run.device {spec!r}: only {torch.cuda.device_count()} GPU(s) visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("run.device is 'mps' but MPS is not available; use run.device=auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"run.device {spec!r} is not supported; use auto, cpu, cuda or mps")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = torch.cuda.is_available()


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``run.amp`` on ``device`` (None = full precision)."""
    if mode == "off":
        return None
    if mode == "fp16":
        if device.type != "cuda":
            warnings.warn(
                "run.amp=fp16 needs CUDA; training in float32 on this device", stacklevel=2
            )
            return None
        return torch.float16
    if mode == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("run.amp=bf16: this GPU does not support bfloat16; use run.amp=fp16")
        tier = onednn_tier()
        if device.type == "cpu" and tier is not None and not native_bf16(tier):
            warnings.warn(
                f"run.amp=bf16 on this CPU (oneDNN tier {tier}, no AVX512-BF16 or AMX) is "
                "emulated and slower than float32 (docs/benchmarks.md); run.amp=off trains faster",
                stacklevel=2,
            )
        return torch.bfloat16
    raise ConfigError(f"run.amp must be off, bf16 or fp16, got {mode!r}")


def channels_last_allowed(
    requested: bool, device: torch.device, modules: Iterable[nn.Module]
) -> bool:
    """Whether to train ``modules`` channels-last: ``requested`` (``run.channels_last``) unless
    the CPU's kernels get it wrong for them (then a one-line warning, and the default layout,
    which gives the same results)."""
    if not requested:
        return False
    reason = channels_last_refusal(device, modules)
    if reason is not None:
        warnings.warn(f"run.channels_last ignored: {reason}; training in NCHW", stacklevel=2)
        return False
    return True


def compile_options(device: torch.device, modules: Iterable[nn.Module]) -> dict[str, Any]:
    """Keyword arguments for ``torch.compile``: on a CPU whose oneDNN kernels break channels-last
    for ``modules``, inductor must not turn convolutions channels-last by itself. Also gives
    inductor a kernel cache of this CPU capability's own (:func:`isolate_compile_cache`)."""
    isolate_compile_cache()
    if channels_last_refusal(device, modules) is not None:
        return {"options": {"layout_optimization": False}}
    return {}


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def rng_state() -> dict[str, Any]:
    """Every RNG state that shapes the rest of a run, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPUs, max resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):
        return float("nan")
