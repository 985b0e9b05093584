"""What a run ran on: selfkd version, git commit, host, devices, world size.

Recorded in the run's ``config.yaml`` (section ``meta``, ignored when the file is read back as a
config), in ``final.json`` and in every experiment tracker's config.
"""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the selfkd checkout this code runs from (``+dirty`` when tracked files
    are modified), or None for an installed package or without git."""
    import selfkd

    root = Path(selfkd.__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head or None


def device_info(device: torch.device) -> tuple[str, int]:
    """(name, count) of the devices of ``device``'s type visible to this process."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device), torch.cuda.device_count()
    if device.type == "mps":
        return "Apple MPS", 1
    return _cpu_name(), 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def run_metadata(device: torch.device, world_size: int) -> dict[str, Any]:
    """The environment of a run, as flat JSON-able values."""
    import selfkd

    name, count = device_info(device)
    return {
        "selfkd": str(selfkd.__version__),
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "world_size": int(world_size),
        "device_name": name,
        "device_count": int(count),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }
