"""Batch samplers that replace the engine's shuffled epoch order.

:class:`ClassPairSampler` is CS-KD's class-wise pair sampler (Yun et al., CVPR 2020; official
``PairBatchSampler`` of alinlab/cs-kd @b447f25, research notes §2): each epoch the training
indices are shuffled and cut into batches of ``batch_size`` *anchors* (the last batch may be
short, as in the official code, unless ``drop_last``); for every anchor one *partner* is drawn
uniformly among all training indices of the anchor's class, which may be the anchor itself.
Each batch is the tensor ``[anchors..., partners...]`` of length 2·B, so the partner of
``batch[i]`` is ``batch[i + B]``.

The order is a pure function of ``(seed, epoch)`` (a ``torch.Generator`` seeded with
:func:`selfkd.data.loader.epoch_seed`), so a resumed run sees the same batches.

Decision: a class with a single training sample is allowed by the official sampler (its partner
is always the anchor itself, so the class-wise term only distils a sample onto another augmented
view of itself) but makes CS-KD degenerate for that class; we refuse it with a
:class:`~selfkd.errors.ConfigError` naming the class. Classes with no sample are fine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from selfkd.data.loader import epoch_seed
from selfkd.errors import ConfigError

__all__ = ["ClassPairSampler"]


class ClassPairSampler:
    """CS-KD batches: B shuffled anchors followed by one same-class partner per anchor.

    ``labels`` are the training labels by dataset index. Calling the sampler with an epoch
    returns that epoch's batches (int64 tensors of length 2·B). With ``world_size > 1`` rank
    ``rank`` gets batches ``rank, rank + world_size, ...`` of the shared epoch order (padded by
    repeating the first batches so every rank has as many); this is for loaders that do not
    shard themselves. The engine's :class:`~selfkd.data.loader.EpochLoader` deals whole batches
    to the ranks already, so under the engine keep the defaults (``rank=0, world_size=1``).
    """

    def __init__(
        self,
        labels: Tensor | Sequence[int],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        drop_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"cskd: data.batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"cskd: seed must be an integer, got {seed!r}")
        if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"cskd: need 0 <= rank < world_size, got rank={rank!r} world_size={world_size!r}"
            )
        labels = torch.as_tensor(labels).detach().cpu().reshape(-1)
        if labels.numel() == 0:
            raise ConfigError("cskd: the class-pair sampler got no training labels")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ConfigError(f"cskd: labels must be integers, got dtype {labels.dtype}")
        labels = labels.long()
        if int(labels.min()) < 0:
            raise ConfigError(f"cskd: labels must be >= 0, got {int(labels.min())}")
        counts = torch.bincount(labels)
        single = torch.nonzero(counts == 1).flatten()
        if single.numel() > 0:
            names = ", ".join(str(int(c)) for c in single[:10])
            more = f" (and {single.numel() - 10} more)" if single.numel() > 10 else ""
            raise ConfigError(
                f"cskd needs at least 2 training samples per class for its class-wise pairs, "
                f"but class {names}{more} has only 1; drop the class or use another method"
            )
        self.labels = labels
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = bool(drop_last)
        # indices grouped by class: class c owns by_class[start[c] : start[c] + counts[c]]
        self._by_class = torch.argsort(labels, stable=True)
        self._counts = counts
        self._start = torch.cumsum(counts, 0) - counts

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n = self.labels.numel()
        total = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return -(-total // self.world_size) if total else 0

    def partners(self, anchors: Tensor, generator: torch.Generator) -> Tensor:
        """One uniformly drawn same-class index per anchor (may be the anchor itself)."""
        cls = self.labels[anchors]
        count = self._counts[cls]
        u = torch.rand(anchors.numel(), generator=generator, dtype=torch.float64)
        offset = torch.minimum((u * count.double()).long(), count - 1)
        return self._by_class[self._start[cls] + offset]

    def __call__(self, epoch: int) -> list[Tensor]:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}")
        g = torch.Generator()
        g.manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(self.labels.numel(), generator=g)
        partners = self.partners(order, g)
        batches = [
            torch.cat([a, p])
            for a, p in zip(
                torch.split(order, self.batch_size),
                torch.split(partners, self.batch_size),
                strict=True,
            )
        ]
        if self.drop_last and batches and batches[-1].numel() < 2 * self.batch_size:
            batches.pop()
        if self.world_size > 1 and batches:
            per_rank = -(-len(batches) // self.world_size)
            total = per_rank * self.world_size
            batches = [batches[i % len(batches)] for i in range(total)][
                self.rank :: self.world_size
            ]
        return batches

    def __repr__(self) -> str:
        return (
            f"ClassPairSampler(n={self.labels.numel()}, batch_size={self.batch_size}, "
            f"seed={self.seed}, rank={self.rank}/{self.world_size})"
        )
