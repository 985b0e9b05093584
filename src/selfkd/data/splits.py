"""Seeded subsets of a training set: a fixed number of samples per class and a held-out split.

Both functions return indices into the ``labels`` they are given, sorted ascending, and depend
only on ``labels`` and ``seed`` (a ``torch.Generator`` on the CPU), so the same config selects the
same samples on every machine and every run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from selfkd.errors import ConfigError, DataError

# Salts keep the permutations of the two functions unrelated when they use the same seed.
_SUBSET_SALT = 0x5EED_0001
_VAL_SALT = 0x5EED_0002


def _generator(seed: int, salt: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"split seed must be an integer, got {seed!r}")
    g = torch.Generator()
    g.manual_seed((seed * 0x9E3779B97F4A7C15 + salt) % (2**63))
    return g


def _labels(labels: Tensor | Sequence[int]) -> Tensor:
    lab = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if lab.numel() and int(lab.min()) < 0:
        raise DataError(f"labels must be non-negative, got {int(lab.min())}")
    return lab


def per_class_subset(
    labels: Tensor | Sequence[int], per_class: int, seed: int, num_classes: int | None = None
) -> Tensor:
    """Indices of ``per_class`` samples of every class, chosen with a seeded permutation.

    For each class, the samples of that class are taken in the order of one seeded permutation of
    all indices and the first ``per_class`` are kept; the result is sorted. Classes are those
    present in ``labels``, or ``0..num_classes-1`` when ``num_classes`` is given (a class with no
    samples is then an error). DataError if a class has fewer than ``per_class`` samples.
    """
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ConfigError(f"data.per_class must be a positive integer, got {per_class!r}")
    lab = _labels(labels)
    counts = torch.bincount(lab, minlength=num_classes or 0)
    classes = range(len(counts)) if num_classes is not None else torch.unique(lab).tolist()
    perm = torch.randperm(lab.numel(), generator=_generator(seed, _SUBSET_SALT))
    permuted = lab[perm]
    chosen = []
    for c in classes:
        have = int(counts[c])
        if have < per_class:
            raise DataError(
                f"class {c} has only {have} training samples but data.per_class is {per_class}; "
                f"lower data.per_class to at most {int(counts[list(classes)].min())}"
            )
        chosen.append(perm[permuted == c][:per_class])
    if not chosen:
        return torch.empty(0, dtype=torch.long)
    return torch.sort(torch.cat(chosen)).values


def _val_count(val_size: int | float, n: int) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ConfigError(
            f"data.val_size must be a count (int) or a fraction (float in (0, 1)), got {val_size!r}"
        )
    if isinstance(val_size, float) and val_size >= 1.0 and val_size.is_integer():
        val_size = int(val_size)  # 5000.0 from a float-typed config field means a count
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ConfigError(
                f"data.val_size as a fraction must lie in (0, 1), got {val_size}; "
                "use an integer for a count"
            )
        count = round(val_size * n)
    else:
        count = val_size
    if not 1 <= count < n:
        raise ConfigError(
            f"data.val_size {val_size!r} selects {count} of {n} training samples; it must leave "
            "at least one sample for validation and one for training"
        )
    return count


def train_val_split(
    labels: Tensor | Sequence[int], val_size: int | float, seed: int, stratified: bool = True
) -> tuple[Tensor, Tensor]:
    """Split indices into ``(train_idx, val_idx)``, both sorted and disjoint.

    ``val_size`` is a count (int, or a float with an integral value >= 1) or a fraction of
    ``len(labels)`` (float in (0, 1), rounded to the nearest count). Stratified: each class
    contributes in proportion to its size (largest remainder rounding so the total is exact; ties
    go to the lower class index), its samples taken in the order of a seeded permutation. Not
    stratified: the first ``val_size`` of a seeded permutation.
    """
    lab = _labels(labels)
    n = lab.numel()
    count = _val_count(val_size, n)
    perm = torch.randperm(n, generator=_generator(seed, _VAL_SALT))
    if not stratified:
        val = perm[:count]
    else:
        counts = torch.bincount(lab)
        exact = counts.double() * count / n
        quota = exact.floor().long()
        missing = count - int(quota.sum())
        if missing > 0:
            remainder = exact - quota.double()
            # stable sort: equal remainders keep class order
            order = torch.sort(-remainder, stable=True).indices
            quota[order[:missing]] += 1
        permuted = lab[perm]
        parts = [perm[permuted == c][: int(q)] for c, q in enumerate(quota.tolist()) if q > 0]
        val = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[val] = False
    train = torch.nonzero(mask).reshape(-1)
    return train, torch.sort(val).values
