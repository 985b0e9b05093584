"""Count where code reads tensor values back to the host (a device synchronisation on a GPU).

``tensor.item()``, ``bool(tensor)`` (``if tensor:``), ``float(tensor)``, ``int(tensor)``,
``tensor.tolist()``, ``tensor.numpy()``, ``tensor.nonzero()`` and indexing with a boolean mask
(its result size depends on the values) all make the host wait for the device to finish the
queued work. On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` reports them; on a CPU-only
machine :func:`count_host_reads` finds them by wrapping those tensor methods for the duration of
a ``with`` block, so tests can assert that a training step has none.

Reads made inside PyTorch's own code are not counted (e.g. Adam reads its step counter, which it
keeps on the host on purpose); reads from selfkd or user code are, with their call sites. On a
CPU-only machine every tensor is a host tensor, so the count is an upper bound of what would
synchronise on a GPU. Not thread-safe: it patches ``torch.Tensor`` while the block runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["HostReads", "count_host_reads"]

#: tensor methods whose result is a host value computed from the tensor's data
READ_METHODS = (
    "item",
    "tolist",
    "numpy",
    "nonzero",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


@dataclass
class HostReads:
    """What a :func:`count_host_reads` block saw: the number of reads and where they were."""

    count: int = 0
    sites: Counter[str] = field(default_factory=Counter)

    def record(self, what: str, depth: int = 2) -> None:
        frame = sys._getframe(depth)
        filename = os.path.abspath(frame.f_code.co_filename)
        if filename.startswith(_TORCH_DIR):
            return
        self.count += 1
        self.sites[f"{filename}:{frame.f_lineno} {what}"] += 1


def _is_mask_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


@contextlib.contextmanager
def count_host_reads() -> Iterator[HostReads]:
    """Count host reads of tensor values made inside the block (see the module docstring)."""
    reads = HostReads()
    originals: dict[str, Callable[..., Any]] = {
        name: getattr(torch.Tensor, name) for name in (*READ_METHODS, "__getitem__")
    }

    def wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            reads.record(name)
            return original(self, *args, **kwargs)

        return counted

    def getitem(self: torch.Tensor, index: Any) -> Any:
        if _is_mask_index(index):
            reads.record("__getitem__[mask]")
        return originals["__getitem__"](self, index)

    try:
        for name in READ_METHODS:
            setattr(torch.Tensor, name, wrap(name, originals[name]))
        torch.Tensor.__getitem__ = getitem  # type: ignore[method-assign]
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
