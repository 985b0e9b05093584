"""Per-sample prediction memory shared by PS-KD and AI-KD ("previous-epoch predictions").

A :class:`PredictionBank` keeps, for every training sample (by dataset index), the
log-probabilities ``log_softmax(z)`` of the last training forward that saw it. Log-probabilities
instead of probabilities: softmax is shift-invariant, so ``softmax(log p / τ) = softmax(z / τ)``
and a consumer can apply any temperature later; and a one-hot row is representable exactly
(0 at the label, ``-inf`` elsewhere). Before the first update every row is the one-hot label, as
in PS-KD's official code (epoch-0 targets are the labels).

The table is a buffer, so it is saved in ``state_dict()`` (every checkpoint) and moved by
``.to()``. Half precision is the default: CIFAR-100 (50k × 100) takes 10 MB, ImageNet
(1.28M × 1000) 2.6 GB instead of 5.1 GB in fp32. fp16 keeps log-probabilities to a relative
precision of about 5e-4 (bfloat16: about 4e-3, but a wider range).

``storage="topk"`` (``topk=k``) keeps, per row, only the k largest log-probabilities and their
class ids, plus the log of the per-class share of the remaining mass,
``rest = log((1 − Σ_top p) / (K − k))`` (computed as a logsumexp of the other entries, no
cancellation). :meth:`PredictionBank.lookup` rebuilds a dense row: the kept entries as stored,
every other class ``rest``, so each row still sums to 1. The error: the kept entries are exact
(up to the storage dtype); every other entry is replaced by the mean of the non-kept ones, so
its probability error is at most the (k+1)-th largest probability p_(k+1) (≤ p_(k)), and the
total-variation distance to the exact row is at most the non-kept mass. With k = K the rows are
exact. Memory per row: k values + k class ids (int16 when K ≤ 32767) + one float32, e.g.
ImageNet (1.28M × 1000) with k = 10 in fp16: 56 MB instead of 2.6 GB dense fp16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfkd.errors import ConfigError

__all__ = [
    "BANK_DTYPES",
    "BANK_STORAGES",
    "PredictionBank",
    "bank_nbytes",
    "bank_storage",
    "check_bank_fits",
    "free_device_memory",
    "resolve_bank_dtype",
]

BANK_STORAGES = ("dense", "topk")

BANK_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

#: ``gather(indices, logits) -> (indices, logits)``: collects the rows of every DDP rank
Gather = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def resolve_bank_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A bank dtype from a torch dtype or its name (float32, float16, bfloat16)."""
    if isinstance(dtype, str):
        if dtype not in BANK_DTYPES:
            raise ConfigError(f"bank dtype must be one of {', '.join(BANK_DTYPES)}, got {dtype!r}")
        return BANK_DTYPES[dtype]
    if dtype not in BANK_DTYPES.values():
        raise ConfigError(f"bank dtype must be one of {', '.join(BANK_DTYPES)}, got {dtype}")
    return dtype


def check_bank_topk(topk: object) -> None:
    """``method.bank_topk`` must be None (dense bank) or a positive integer."""
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ConfigError(f"method.bank_topk must be a positive integer or null, got {topk!r}")


def _id_dtype(num_classes: int) -> torch.dtype:
    return torch.int16 if num_classes <= 32767 else torch.int32


def bank_nbytes(
    num_samples: int,
    num_classes: int,
    dtype: torch.dtype | str = torch.float16,
    storage: str = "dense",
    topk: int | None = None,
) -> int:
    """Bytes a bank of this shape takes (without allocating it)."""
    size = torch.empty((), dtype=resolve_bank_dtype(dtype)).element_size()
    if storage == "dense":
        return num_samples * num_classes * size
    k = int(topk or 0)
    ids = torch.empty((), dtype=_id_dtype(num_classes)).element_size()
    return num_samples * (k * (size + ids) + 4)


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (``torch.cuda.mem_get_info``); None elsewhere (no check)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def check_bank_fits(
    num_samples: int,
    num_classes: int,
    dtype: torch.dtype | str,
    storage: str,
    topk: int | None,
    device: torch.device,
) -> None:
    """ConfigError naming smaller storages when the bank would not fit in the device's free memory.

    The bank lives on the training device so that a step never copies rows between host and
    device; a bank that does not fit there is refused before anything is allocated.
    """
    free = free_device_memory(device)
    need = bank_nbytes(num_samples, num_classes, dtype, storage, topk)
    if free is None or need <= free:
        return
    mib = 2**20
    options = []
    if resolve_bank_dtype(dtype).itemsize > 2 and storage == "dense":
        half = bank_nbytes(num_samples, num_classes, torch.float16)
        options.append(f"method.bank_dtype: float16 ({half / mib:,.0f} MiB)")
    for k in (10, 5, 1):
        if k < num_classes and (storage == "dense" or k < (topk or 0)):
            small = bank_nbytes(num_samples, num_classes, torch.float16, "topk", k)
            options.append(f"method.bank_topk: {k} ({small / mib:,.0f} MiB)")
            break
    hint = f"; use {' or '.join(options)}" if options else "; use a device with more memory"
    raise ConfigError(
        f"the prediction bank ({num_samples:,} samples x {num_classes} classes, {storage}) "
        f"needs {need / mib:,.0f} MiB on {device} but {free / mib:,.0f} MiB are free{hint}"
    )


def bank_storage(method: str, topk: int | None, num_classes: int) -> dict[str, object]:
    """``PredictionBank`` storage arguments for a method's ``bank_topk`` parameter."""
    if topk is None:
        return {"storage": "dense"}
    if topk > num_classes:
        raise ConfigError(
            f"method {method}: bank_topk {topk} exceeds the {num_classes} classes; lower it or "
            "set it to null (dense bank)"
        )
    return {"storage": "topk", "topk": int(topk)}


class PredictionBank(nn.Module):
    """An N×K table of per-sample log-probabilities, indexed by dataset index.

    ``lookup``/``probs`` return float32 rows; ``update`` overwrites rows with
    ``log_softmax(logits)`` (detached, vectorized with ``index_copy_``). ``reset`` restores the
    one-hot labels. ``storage="topk"`` with ``topk=k`` keeps only the k largest entries of each
    row (see the module docstring).
    """

    table: Tensor
    labels: Tensor

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        labels: Tensor,
        dtype: torch.dtype | str = torch.float16,
        storage: str = "dense",
        topk: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        dtype = resolve_bank_dtype(dtype)
        if storage not in BANK_STORAGES:
            raise ConfigError(
                f"bank storage must be one of {', '.join(BANK_STORAGES)}, got {storage!r}"
            )
        if storage == "topk" and (
            isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= num_classes
        ):
            raise ConfigError(
                f"a top-k bank needs an integer topk in [1, {num_classes}] (the class count), "
                f"got {topk!r}"
            )
        if num_samples < 1 or num_classes < 1:
            raise ConfigError(
                f"a prediction bank needs num_samples >= 1 and num_classes >= 1, got "
                f"{num_samples} and {num_classes}"
            )
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.numel() != num_samples:
            raise ConfigError(
                f"a prediction bank of {num_samples} samples got {labels.numel()} labels"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ConfigError(
                f"bank labels must lie in [0, {num_classes}), got range "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.storage = storage
        self.topk = topk if storage == "topk" else None
        # allocated where it is used (``device``; default CPU), checked to fit there first
        at = torch.device(device) if device is not None else torch.device("cpu")
        check_bank_fits(num_samples, num_classes, dtype, storage, self.topk, at)
        # labels are data, not state: rebuilt from the dataset, so not saved in the state_dict
        self.register_buffer("labels", labels.clone().to(at), persistent=False)
        if storage == "dense":
            table = torch.empty(num_samples, num_classes, dtype=dtype, device=at)
            self.register_buffer("table", table)
        else:
            k = int(topk)  # type: ignore[arg-type]
            ids = _id_dtype(num_classes)
            self.register_buffer("top_values", torch.empty(num_samples, k, dtype=dtype, device=at))
            self.register_buffer("top_ids", torch.empty(num_samples, k, dtype=ids, device=at))
            self.register_buffer("rest", torch.empty(num_samples, dtype=torch.float32, device=at))
        self.reset()

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype if self.storage == "dense" else self.top_values.dtype

    @property
    def nbytes(self) -> int:
        """Memory taken by the stored rows (also what they add to a checkpoint)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n != "labels")

    @torch.no_grad()
    def reset(self) -> None:
        """Restore the one-hot labels: log-prob 0 at the label, -inf elsewhere."""
        if self.storage == "dense":
            self.table.fill_(float("-inf"))
            labels = self.labels.to(self.table.device)
            self.table.scatter_(1, labels[:, None], 0.0)
            return
        device = self.top_values.device
        labels = self.labels.to(device)
        k = self.top_values.shape[1]
        # distinct ids per row, the label first: (label + j) mod K
        ids = (labels[:, None] + torch.arange(k, device=device)) % self.num_classes
        self.top_ids.copy_(ids.to(self.top_ids.dtype))
        self.top_values.fill_(float("-inf"))
        self.top_values[:, 0] = 0.0
        self.rest.fill_(float("-inf"))

    @property
    def _device(self) -> torch.device:
        return self.table.device if self.storage == "dense" else self.top_values.device

    def _index(self, indices: Tensor) -> Tensor:
        indices = torch.as_tensor(indices).reshape(-1).to(self._device, torch.long)
        return indices

    def lookup(self, indices: Tensor) -> Tensor:
        """Float32 log-probabilities of the samples ``indices`` (B×K, on the bank's device).

        Top-k storage: the kept entries as stored, every other class the row's ``rest``.
        """
        index = self._index(indices)
        if self.storage == "dense":
            return self.table.index_select(0, index).float()
        rest = self.rest.index_select(0, index)
        out = rest[:, None].expand(index.numel(), self.num_classes).contiguous()
        ids = self.top_ids.index_select(0, index).long()
        return out.scatter_(1, ids, self.top_values.index_select(0, index).float())

    def probs(self, indices: Tensor) -> Tensor:
        """Float32 probabilities of the samples ``indices`` (B×K): ``exp(lookup(indices))``."""
        return self.lookup(indices).exp()

    @torch.no_grad()
    def update(self, indices: Tensor, logits: Tensor, gather: Gather | None = None) -> None:
        """Overwrite the rows ``indices`` with ``log_softmax(logits)`` (detached).

        One vectorized ``index_copy_``, no loop over rows. If ``indices`` holds a sample twice
        (e.g. DistributedSampler padding) its last row is kept (every occurrence is given that
        row before the write, so every device and every DDP rank keeps the same one).
        ``gather``: under DDP, a callable that all-gathers ``(indices, logits)`` from every rank
        so all ranks write the same rows (plugged in by the engine; None = single process).
        """
        if gather is not None:
            indices, logits = gather(indices, logits)
        index = self._index(indices)
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"bank update expects B×{self.num_classes} logits, got {tuple(logits.shape)}"
            )
        if logits.shape[0] != index.numel():
            raise ValueError(
                f"bank update got {index.numel()} indices for {logits.shape[0]} rows of logits"
            )
        log_p = F.log_softmax(logits.detach().float(), dim=1).to(self._device)
        index, log_p = _last_of_each(index, log_p)
        if self.storage == "dense":
            self.table.index_copy_(0, index, log_p.to(self.table.dtype))
            return
        k = self.top_values.shape[1]
        values, ids = log_p.topk(k, dim=1)
        if k < self.num_classes:
            others = log_p.scatter(1, ids, float("-inf"))  # the non-kept entries
            rest = torch.logsumexp(others, dim=1) - math.log(self.num_classes - k)
        else:
            rest = torch.full((log_p.shape[0],), float("-inf"), device=log_p.device)
        self.top_values.index_copy_(0, index, values.to(self.top_values.dtype))
        self.top_ids.index_copy_(0, index, ids.to(self.top_ids.dtype))
        self.rest.index_copy_(0, index, rest)

    def update_unmixed(
        self, indices: Tensor, logits: Tensor, mix: Any | None, gather: Gather | None = None
    ) -> None:
        """:meth:`update` with a training step's predictions, leaving out rows ``data.mix``
        mixed (``mix``: the step's :class:`~selfkd.data.mixing.MixInfo` or None): a mixed row is
        not a prediction of its own sample. Rows are selected by position, with no host read."""
        if mix is not None:
            keep = mix.unmixed_rows()
            indices, logits = indices[keep], logits[keep]
        self.update(indices, logits, gather=gather)

    def extra_repr(self) -> str:
        storage = "" if self.storage == "dense" else f", storage=topk, topk={self.topk}"
        return (
            f"num_samples={self.num_samples}, num_classes={self.num_classes}, "
            f"dtype={self.dtype}{storage}, nbytes={self.nbytes}"
        )


def _last_of_each(index: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Give every occurrence of a repeated index the row of its last occurrence.

    Then a write with duplicate indices stores the same row whichever occurrence wins, on any
    device. Vectorized and free of host synchronisation (sort + searchsorted).
    """
    if index.numel() < 2:
        return index, rows
    ordered, order = torch.sort(index, stable=True)
    last = torch.searchsorted(ordered, ordered, right=True) - 1
    source = torch.empty_like(order)
    source[order] = order[last]
    return index, rows[source]
