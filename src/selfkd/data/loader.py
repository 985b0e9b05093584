"""Deterministic, resumable epoch loaders.

:class:`EpochLoader` needs no saved state to resume: the sample order of epoch ``e`` is a
``torch.randperm`` drawn from a ``torch.Generator`` seeded from ``(seed, e)`` only, so after a
restart ``loader.iterate(epoch, start_batch=k)`` continues exactly where the run stopped.

Batches are ``(images, labels, indices)`` CPU tensors; ``indices`` (int64) are positions in the
dataset the loader was given (for the training set: 0..num_train-1).

* In-memory datasets (:class:`~selfkd.data.base.ArrayImageDataset`) yield uint8 images gathered
  with one indexing operation per batch; augmentation happens later, on the device.
* File datasets (:class:`~selfkd.data.imagefolder.FileImageDataset`) are decoded and transformed
  by a torch ``DataLoader`` (``num_workers=workers``, persistent workers when ``workers > 0``)
  driven by the same batch lists. Only one iteration of such a loader may be active at a time.

Distributed (``world_size > 1``): like ``torch.utils.data.DistributedSampler`` (drop_last=False),
the epoch's order is padded by repeating its first samples up to a multiple of ``world_size`` and
rank ``r`` takes positions ``r, r + world_size, ...``, so every rank gets the same number of
samples and batches. Evaluation loaders are sharded the same way: padded duplicates carry the same
index, so gathered predictions can be de-duplicated by index. ``drop_last`` then drops each
rank's incomplete final batch.

A custom ``batch_sampler`` is a callable ``(epoch) -> list of index tensors`` replacing the
default order (e.g. CS-KD's class-pair sampler). It must itself be deterministic in ``epoch``.
Its batches are used as given (``batch_size``/``shuffle``/``drop_last`` do not apply); with
``world_size > 1`` whole batches are dealt round-robin to the ranks (batch ``i`` goes to rank
``i % world_size``), padding with the first batches so every rank gets as many, so the sampler
should produce per-rank-sized batches.

Corrupt image files (file datasets only): a file that cannot be decoded raises a one-line
:class:`~selfkd.errors.DataError` naming it, in the main process, also with ``workers > 0`` (the
workers hand a :class:`~selfkd.data.imagefolder.CorruptImage` marker to the collate function
instead of raising). With ``skip_corrupt=True`` (``data.skip_corrupt``) the sample is dropped from
its batch instead, and counted on the loader: ``skipped`` (every skip since the loader was made),
``epoch_skipped`` (skips in the current or last pass) and ``skipped_files`` (path -> reason, each
distinct file once). A :class:`SkippedImageWarning` names each file the first time it is skipped,
and one more gives the pass's count at the end of every pass that skipped something. A batch all
of whose images are corrupt is not yielded at all, so the epoch then has one batch fewer (the
position counted by a caller that enumerates the batches runs behind ``batches(epoch)`` by one,
and a mid-epoch resume in that epoch may repeat a batch).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

from selfkd.data.base import ArrayImageDataset
from selfkd.data.imagefolder import CorruptImage
from selfkd.errors import ConfigError, DataError

BatchSampler = Callable[[int], Sequence[Tensor]]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of ``epoch``'s order: a fixed hash of ``(seed, epoch)`` in [0, 2**63)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) >> 1


class _BatchList:
    """A re-targetable batch sampler for a (possibly persistent) torch DataLoader."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class SkippedImageWarning(UserWarning):
    """A corrupt image file was skipped because ``data.skip_corrupt`` is set."""


class _Guarded(torch.utils.data.Dataset):
    """Wraps a file dataset so that workers return a CorruptImage marker instead of raising."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        load = getattr(self.dataset, "load", None)
        return load(index) if load is not None else self.dataset[index]


def _collate(items: list[Any]) -> tuple[Any, Any, Any, list[CorruptImage]]:
    """``(images, labels, indices, corrupt)``: the decodable samples collated, the rest listed."""
    bad = [it for it in items if isinstance(it, CorruptImage)]
    good = [it for it in items if not isinstance(it, CorruptImage)]
    if not good:
        return None, None, None, bad
    x, y, idx = default_collate(good)
    return x, y, idx, bad


class EpochLoader:
    """Batches of one dataset, with an order that is a pure function of ``(seed, epoch)``."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_sampler: BatchSampler | None = None,
        pin_memory: bool = False,
        skip_corrupt: bool = False,
        name: str = "data",
    ) -> None:
        for key, value, low in (("batch_size", batch_size, 1), ("workers", workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"data.{key} must be an integer >= {low}, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"need 0 <= rank < world_size, got rank={rank!r} world_size={world_size!r}"
            )
        if len(dataset) == 0:
            raise DataError("the dataset is empty; check data.root and the subset settings")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = seed
        self.workers = workers
        self.rank = rank
        self.world_size = world_size
        self.batch_sampler = batch_sampler
        self.pin_memory = pin_memory
        if not isinstance(skip_corrupt, bool):
            raise ConfigError(f"data.skip_corrupt must be true or false, got {skip_corrupt!r}")
        self.skip_corrupt = skip_corrupt
        self.name = str(name)
        self.skipped = 0  # corrupt samples skipped since this loader was made
        self.epoch_skipped = 0  # ... in the current (or last) pass
        self.skipped_files: dict[str, str] = {}  # path -> reason, each file once
        self.in_memory = isinstance(dataset, ArrayImageDataset) or hasattr(dataset, "get_batch")
        self._torch_loader: torch.utils.data.DataLoader | None = None
        self._sampler = _BatchList()
        self._len: int | None = None
        if batch_sampler is None and len(self) == 0:
            raise ConfigError(
                f"batch_size {batch_size} is larger than the {self.num_samples} samples per rank "
                "and drop_last is set, so an epoch has no batch; lower batch_size or set "
                "drop_last false"
            )

    def set_batch_sampler(self, batch_sampler: BatchSampler | None) -> None:
        """Replace the epoch order (e.g. by CS-KD's class-pair sampler)."""
        self.batch_sampler = batch_sampler
        self._len = None

    @property
    def num_samples(self) -> int:
        """Samples per rank per epoch with the default order (including distributed padding)."""
        return -(-len(self.dataset) // self.world_size)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.batch_sampler is not None:
            if self._len is None:
                self._len = len(self.batches(0))
            return self._len
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> Tensor:
        """This rank's sample order for ``epoch`` (default sampler), int64."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(epoch_seed(self.seed, epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            total = self.num_samples * self.world_size
            if total > n:
                reps = -(-total // n)
                order = order.repeat(reps)[:total]
            order = order[self.rank : total : self.world_size]
        return order

    def batches(self, epoch: int) -> list[Tensor]:
        """This rank's batches (int64 index tensors) for ``epoch``; regenerated on every call."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}")
        if self.batch_sampler is not None:
            out = [
                torch.as_tensor(b, dtype=torch.long).reshape(-1) for b in self.batch_sampler(epoch)
            ]
            if self.world_size > 1 and out:
                per_rank = -(-len(out) // self.world_size)
                total = per_rank * self.world_size
                out = [out[i % len(out)] for i in range(total)][self.rank :: self.world_size]
            return out
        chunks = list(torch.split(self.order(epoch), self.batch_size))
        if self.drop_last and chunks and chunks[-1].numel() < self.batch_size:
            chunks.pop()
        return chunks

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield ``(images, labels, indices)`` for ``batches(epoch)[start_batch:]``."""
        batches = self.batches(epoch)
        if (
            isinstance(start_batch, bool)
            or not isinstance(start_batch, int)
            or not (0 <= start_batch <= len(batches))
        ):
            raise ConfigError(
                f"start_batch must lie in 0..{len(batches)} for an epoch of {len(batches)} "
                f"batches, got {start_batch!r}; the checkpoint may come from another data config"
            )
        batches = batches[start_batch:]
        if self.in_memory:
            return self._iterate_arrays(batches)
        return self._iterate_files(batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Epoch 0 (for evaluation loaders, whose order does not depend on the epoch)."""
        return self.iterate(0)

    def _iterate_arrays(self, batches: list[Tensor]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for idx in batches:
            x, y = self.dataset.get_batch(idx)
            if self.pin_memory:
                x, y, idx = x.pin_memory(), y.pin_memory(), idx.pin_memory()
            yield x, y, idx

    def _iterate_files(self, batches: list[Tensor]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        if self._torch_loader is None:
            self._torch_loader = torch.utils.data.DataLoader(
                _Guarded(self.dataset),
                batch_sampler=self._sampler,
                num_workers=self.workers,
                persistent_workers=self.workers > 0,
                pin_memory=self.pin_memory,
                collate_fn=_collate,
            )
        self._sampler.batches = [b.tolist() for b in batches]
        self.epoch_skipped = 0
        for x, y, idx, bad in self._torch_loader:
            for item in bad:
                self._skip(item)
            if x is not None:
                yield x, y.long(), idx.long()
        if self.epoch_skipped:
            warnings.warn(
                f"{self.name} data: skipped {self.epoch_skipped} corrupt image(s) in this pass, "
                f"{self.skipped} since the start ({len(self.skipped_files)} distinct files; "
                "data.skip_corrupt is set)",
                SkippedImageWarning,
                stacklevel=2,
            )

    def _skip(self, item: CorruptImage) -> None:
        """Raise the one-line DataError for ``item``, or count it when skipping is on."""
        if not self.skip_corrupt:
            raise item.error()
        self.skipped += 1
        self.epoch_skipped += 1
        if item.path not in self.skipped_files:
            self.skipped_files[item.path] = item.reason
            warnings.warn(
                f"{self.name} data: skipped corrupt image {item.path} ({item.reason}); "
                f"{self.epoch_skipped} skipped in this pass, {self.skipped} since the start "
                "(data.skip_corrupt is set)",
                SkippedImageWarning,
                stacklevel=3,
            )

    def __repr__(self) -> str:
        return (
            f"EpochLoader(n={len(self.dataset)}, batch_size={self.batch_size}, "
            f"batches={len(self)}, shuffle={self.shuffle}, rank={self.rank}/{self.world_size})"
        )
