"""What the CPU's kernels do well and what they get wrong: oneDNN's instruction-set tier, native
bfloat16, and the channels-last convolutions that oneDNN's AVX2 kernels break.

Measured with torch 2.14 / oneDNN 3.12 (``ONEDNN_MAX_CPU_ISA`` lowers the tier on a bigger CPU;
every float32 convolution checked against a float64 reference, see docs/reliability.md):

* On the AVX2 tiers (``avx2``, ``avx2_vnni``, ``avx2_vnni_2``: any x86 CPU without AVX-512)
  the weight gradient of a channels-last, ungrouped 1×1 convolution with stride > 1 and fewer
  than 8 input channels (``jit_1x1:avx2`` backward-weights) is wrong with 2 or more threads
  (relative error up to ~0.9) and corrupts the heap with 1 thread (abort or segfault). Every
  other shape, every contiguous (NCHW) convolution, grouped ones, bfloat16, and the AVX-512,
  AVX and SSE4.1 tiers are right. ``torch.compile`` reaches the same kernel on the CPU through
  inductor's layout optimisation, which turns convolutions channels-last by itself.
* inductor (``torch.compile``) keeps compiled CPU kernels in one on-disk cache whatever the
  ATen CPU capability: kernels cached by a process under ``ATEN_CPU_CAPABILITY=avx2`` segfault
  in a later AVX-512 process that loads them. :func:`isolate_compile_cache` gives each
  capability its own cache directory.
* bfloat16 autocast is fast only where oneDNN has native bf16 instructions (AVX512-BF16 or
  AMX); elsewhere it is emulated and slower than float32 (docs/benchmarks.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, MutableMapping
from functools import lru_cache

import torch
from torch import nn

#: oneDNN's ISA tiers, lowest first (names as ``ONEDNN_MAX_CPU_ISA`` takes them, lower case)
TIERS: tuple[str, ...] = (
    "sse41",
    "avx",
    "avx2",
    "avx2_vnni",
    "avx2_vnni_2",
    "avx512_core",
    "avx512_core_vnni",
    "avx512_core_bf16",
    "avx10_1_512",
    "avx10_1_512_amx",
    "avx10_1_512_amx_fp16",
)
_ALIASES = {
    "avx512_core_fp16": "avx10_1_512",
    "avx512_core_amx": "avx10_1_512_amx",
    "avx512_core_amx_fp16": "avx10_1_512_amx_fp16",
}
#: tiers whose AVX2 convolution kernels compute the wrong gradient described above
AVX2_TIERS = frozenset({"avx2", "avx2_vnni", "avx2_vnni_2"})
#: input channels below which the 1x1 strided channels-last weight gradient is wrong there
AVX2_MIN_CHANNELS = 8


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def hardware_tier(flags: Iterable[str] | None = None) -> str | None:
    """The highest oneDNN tier the CPU's ``flags`` support; None off x86 or when unknown."""
    f = set(cpu_flags() if flags is None else flags)
    if not f:  # no /proc/cpuinfo (macOS, Windows): ask torch's cpuinfo
        probe = getattr(torch, "cpu", None)
        for name, flag in (
            ("_is_avx512_bf16_supported", "avx512_bf16"),
            ("_is_avx512_supported", "avx512f"),
            ("_is_avx2_supported", "avx2"),
        ):
            check = getattr(probe, name, None)
            if check is not None and check():
                f |= {flag} | ({"avx512bw", "avx512vl", "avx512dq"} if "512" in flag else set())
    core = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= f
    if core and {"amx_bf16", "amx_tile"} <= f:
        return "avx10_1_512_amx"
    if core and "avx512_bf16" in f:
        return "avx512_core_bf16"
    if core and "avx512_vnni" in f:
        return "avx512_core_vnni"
    if core:
        return "avx512_core"
    if "avx2" in f:
        return "avx2_vnni" if "avx_vnni" in f else "avx2"
    if "avx" in f:
        return "avx"
    if "sse4_1" in f:
        return "sse41"
    return None


def onednn_tier(
    flags: Iterable[str] | None = None, env: Mapping[str, str] | None = None
) -> str | None:
    """The tier oneDNN runs at: the CPU's, lowered by ``ONEDNN_MAX_CPU_ISA`` (or
    ``DNNL_MAX_CPU_ISA``) when set; None off x86 or when unknown."""
    hw = hardware_tier(flags)
    if hw is None:
        return None
    env = os.environ if env is None else env
    cap = (env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or "").strip().lower()
    cap = _ALIASES.get(cap, cap)
    if cap in TIERS and TIERS.index(cap) < TIERS.index(hw):
        return cap
    return hw


def native_bf16(tier: str | None = None) -> bool:
    """Whether oneDNN has native bfloat16 instructions at ``tier`` (default: this process's)."""
    tier = onednn_tier() if tier is None else tier
    return tier is not None and TIERS.index(tier) >= TIERS.index("avx512_core_bf16")


def avx2_conv_hazards(modules: Iterable[nn.Module]) -> list[tuple[str, nn.Conv2d]]:
    """Trainable convolutions of ``modules`` whose channels-last weight gradient oneDNN's AVX2
    kernels get wrong: 1×1, stride > 1, ungrouped, fewer than 8 input channels."""
    found = []
    for i, module in enumerate(modules):
        for name, m in module.named_modules():
            if (
                isinstance(m, nn.Conv2d)
                and m.weight.requires_grad
                and tuple(m.kernel_size) == (1, 1)
                and tuple(m.stride) != (1, 1)
                and m.groups == 1
                and m.in_channels < AVX2_MIN_CHANNELS
            ):
                found.append((f"{type(module).__name__ if i else 'model'}.{name}", m))
    return found


def channels_last_refusal(
    device: torch.device, modules: Iterable[nn.Module], tier: str | None = None
) -> str | None:
    """Why channels-last must not be used on ``device`` for ``modules`` (a one-line reason), or
    None when it is safe: only oneDNN's AVX2 tiers on the CPU with a hazardous convolution."""
    if device.type != "cpu":
        return None
    tier = onednn_tier() if tier is None else tier
    if tier not in AVX2_TIERS:
        return None
    hazards = avx2_conv_hazards(modules)
    if not hazards:
        return None
    name, conv = hazards[0]
    more = f" (and {len(hazards) - 1} more)" if len(hazards) > 1 else ""
    return (
        f"oneDNN's {tier} kernels (no AVX-512 on this CPU or under ONEDNN_MAX_CPU_ISA) compute a "
        f"wrong weight gradient, or crash with 1 thread, for the channels-last 1x1 stride-"
        f"{conv.stride[0]} convolution {name}{more} with {conv.in_channels} < "
        f"{AVX2_MIN_CHANNELS} input channels"
    )


def isolate_compile_cache(env: MutableMapping[str, str] | None = None) -> str:
    """Point inductor's kernel cache (``TORCHINDUCTOR_CACHE_DIR``) at a directory of this ATen
    CPU capability's own, unless the user chose one; returns the directory in use."""
    env = os.environ if env is None else env
    default = _default_compile_cache()
    current = env.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default):
        capability = torch.backends.cpu.get_cpu_capability().lower()
        env["TORCHINDUCTOR_CACHE_DIR"] = f"{default}-{capability}"
    return env["TORCHINDUCTOR_CACHE_DIR"]


def _default_compile_cache() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return str(default_cache_dir())
    except ImportError:  # another torch layout: inductor's documented default
        import getpass
        import tempfile

        return os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
