"""Datasets, splits, loaders and device-side augmentation.

The engine calls :func:`build_data` once and gets a :class:`DataBundle`. Training batches are
``(images, labels, indices)`` CPU tensors from ``bundle.train_loader.iterate(epoch, start_batch)``;
the engine moves them to the device and applies ``bundle.transform.train`` (``.eval`` for the
test/val loaders). ``indices`` are positions in the training set actually used
(0..num_train-1), stable for a given (dataset, per_class, val_size, split_seed).

Order of selection (all on the original training-set indices, seeded with ``split_seed``):
first the validation split is held out of the full training set (``val_size``: a count or a
fraction of the full training set, stratified by class), then ``per_class`` samples of each class
are drawn from the rest. So ``per_class`` is the exact number of training samples per class and
the validation set does not depend on ``per_class``. The kept samples are then re-indexed
0..num_train-1 in ascending order of their original index.

Class coverage is checked once here, for every dataset: a class with no training sample (in the
dataset's training split, or after ``val_size``/``per_class``) is a DataError naming it; a class
with no sample in the test split or the validation split is a warning naming it.
``skip_corrupt`` (``data.skip_corrupt``) makes the loaders of file datasets skip, count and warn
about image files that cannot be decoded instead of stopping (see :mod:`selfkd.data.loader`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# imported to register their dataset entries
from selfkd.data import (  # noqa: F401
    cifar,
    finegrained,
    idx,
    imagefolder,
    imagenet,
    synthetic,
    tinyimagenet,
)
from selfkd.data.augment import BatchTransform
from selfkd.data.base import ArrayImageDataset, AugmentSpec, RawSplits
from selfkd.data.imagefolder import FileImageDataset, build_file_transforms
from selfkd.data.loader import BatchSampler, EpochLoader, epoch_seed
from selfkd.data.mixing import Mixer, MixInfo
from selfkd.data.registry import DATASETS, check_options
from selfkd.data.splits import per_class_subset, train_val_split
from selfkd.errors import ConfigError, DataError

__all__ = [
    "DATASETS",
    "ArrayImageDataset",
    "AugmentSpec",
    "BatchSampler",
    "BatchTransform",
    "DataBundle",
    "EpochLoader",
    "FileImageDataset",
    "MixInfo",
    "Mixer",
    "RawSplits",
    "build_data",
    "build_data_from_config",
    "check_options",
    "epoch_seed",
    "per_class_subset",
    "train_val_split",
]


@dataclass
class DataBundle:
    """Everything the engine needs about the data of a run.

    ``transform`` turns loader batches (moved to the device) into model inputs: ``.train`` with
    augmentation, ``.eval`` without. ``train_labels`` (int64) is aligned with training indices.
    ``train_source_indices`` are the original training-set indices of the kept samples
    (``train_source_indices[i]`` is training sample ``i``), ``val_source_indices`` likewise.
    ``resolved`` is a plain dict of every resolved setting, for the run's config: ``name``,
    ``root``, ``options``, ``num_classes``, ``in_channels``, ``image_size``, ``normalize``
    ({mean, std}), ``augment`` ({kind, crop_size, crop_padding, hflip, where}), flat copies
    ``mean``/``std``/``crop_padding``/``hflip``, the split settings, loader settings,
    ``sizes`` ({train_full, train, val, test}) and ``batches_per_epoch``.
    """

    train_loader: EpochLoader
    test_loader: EpochLoader
    val_loader: EpochLoader | None
    num_classes: int
    in_channels: int
    image_size: int
    num_train: int
    train_labels: Tensor
    class_names: list[str]
    transform: BatchTransform
    resolved: dict[str, Any] = field(default_factory=dict)
    train_source_indices: Tensor | None = None
    val_source_indices: Tensor | None = None


def _resolve_normalize(
    normalize: Mapping[str, Any] | None, raw: RawSplits
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if normalize is None:
        return tuple(raw.mean), tuple(raw.std)
    if not isinstance(normalize, Mapping):
        raise ConfigError(
            f"data.normalize must be a mapping {{mean: [...], std: [...]}}, got {normalize!r}"
        )
    norm = _check_keys("data.normalize", normalize, {"mean": raw.mean, "std": raw.std})
    out = []
    for key in ("mean", "std"):
        value = norm[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        try:
            vals = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"data.normalize.{key} must be a list of numbers, got {value!r}"
            ) from None
        if len(vals) == 1 and raw.in_channels > 1:
            vals = vals * raw.in_channels
        if len(vals) != raw.in_channels:
            raise ConfigError(
                f"data.normalize.{key} has {len(vals)} values but the images have "
                f"{raw.in_channels} channels; give one value per channel"
            )
        out.append(vals)
    if any(s <= 0 for s in out[1]):
        raise ConfigError(f"data.normalize.std must be positive, got {list(out[1])}")
    return out[0], out[1]


def _check_keys(
    section: str, values: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    unknown = [k for k in values if k not in defaults]
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} in {section}; accepted: {', '.join(sorted(defaults))}"
        )
    return {**defaults, **values}


def _resolve_augment(augment: Mapping[str, Any] | None, raw: RawSplits) -> AugmentSpec:
    spec = AugmentSpec(**raw.augment.as_dict())
    if augment is None:
        return spec
    if not isinstance(augment, Mapping):
        raise ConfigError(
            f"data.augment must be a mapping {{crop_padding, hflip}}, got {augment!r}"
        )
    values = _check_keys(
        "data.augment", augment, {"crop_padding": spec.crop_padding, "hflip": spec.hflip}
    )
    pad, flip = values["crop_padding"], values["hflip"]
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ConfigError(f"data.augment.crop_padding must be an integer >= 0, got {pad!r}")
    if not isinstance(flip, bool):
        raise ConfigError(f"data.augment.hflip must be true or false, got {flip!r}")
    if spec.kind != "pad_crop" and "crop_padding" in augment and pad:
        raise ConfigError(
            "data.augment.crop_padding does not apply to the random-resized-crop protocol; "
            "remove it or set data.options.protocol: cifar"
        )
    spec.crop_padding, spec.hflip = pad, flip
    return spec


def _classes(names: list[str], missing: list[int]) -> str:
    shown = ", ".join(repr(names[c]) for c in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return f"class {shown}" if len(missing) == 1 else f"classes {shown}{more}"


def _counts(labels: Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels.reshape(-1).long(), minlength=num_classes).tolist()


def _require_train_classes(labels: Tensor, names: list[str], after: str, fix: str) -> None:
    """DataError naming the classes left with no training sample."""
    missing = [c for c, n in enumerate(_counts(labels, len(names))) if n == 0]
    if missing:
        what = _classes(names, missing)
        verb = "has" if len(missing) == 1 else "have"
        raise DataError(f"{what} {verb} no training images {after}; {fix}")


def _warn_missing_classes(labels: Tensor, names: list[str], split: str, fix: str) -> None:
    """Warn about the classes with no sample in an evaluation split."""
    missing = [c for c, n in enumerate(_counts(labels, len(names))) if n == 0]
    if missing:
        warnings.warn(
            f"the {split} has no images of {_classes(names, missing)}; their accuracy is not "
            f"measured ({fix})",
            UserWarning,
            stacklevel=3,
        )


def build_data(
    *,
    name: str,
    root: str | None = None,
    batch_size: int = 128,
    eval_batch_size: int = 512,
    per_class: int | None = None,
    val_size: int | float = 0,
    split_seed: int = 0,
    seed: int = 0,
    workers: int = 0,
    augment: Mapping[str, Any] | None = None,
    normalize: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    skip_corrupt: bool = False,
    download: bool = False,
) -> DataBundle:
    """Load dataset ``name`` and build its loaders, subsets and batch transform.

    ``augment`` may set ``crop_padding`` and ``hflip``; ``normalize`` may set ``mean`` and
    ``std`` (one value per channel, or one for all); ``options`` go to the dataset entry.
    ``seed`` drives the training order (see :class:`EpochLoader`), ``split_seed`` the subsets.
    ``skip_corrupt`` skips (and counts on the loaders) image files that cannot be decoded.
    ``download`` fetches a dataset that is absent (:mod:`selfkd.data.download`).
    """
    canonical = DATASETS.canonical(name)
    if options is not None and not isinstance(options, Mapping):
        raise ConfigError(f"data.options must be a mapping, got {options!r}")
    factory = DATASETS.get(canonical)
    if download:
        from selfkd.data.download import load_with_download

        raw = load_with_download(canonical, root, lambda: factory(root, **dict(options or {})))
    else:
        raw = factory(root, **dict(options or {}))
    mean, std = _resolve_normalize(normalize, raw)
    spec = _resolve_augment(augment, raw)

    n_full = len(raw.train)
    all_labels = raw.train.labels
    names = [str(c) for c in raw.class_names]
    if len(names) != raw.num_classes:
        names = [str(c) for c in range(raw.num_classes)]
    _require_train_classes(
        all_labels,
        names,
        "in the dataset's training split",
        "add training images of it or remove the class",
    )
    pool = None  # original indices still available for training (None = all)
    val_src = None
    if val_size:
        pool, val_src = train_val_split(all_labels, val_size, split_seed)
        _require_train_classes(
            all_labels[pool],
            names,
            f"after data.val_size={val_size!r} holds samples out for validation",
            "lower data.val_size or add training images",
        )
    if per_class is not None:
        labels = all_labels if pool is None else all_labels[pool]
        counts = _counts(labels, raw.num_classes)
        short = [c for c, n in enumerate(counts) if n < per_class]
        if isinstance(per_class, int) and not isinstance(per_class, bool) and short:
            after = f" after data.val_size={val_size!r}" if val_size else ""
            raise DataError(
                f"{_classes(names, short)} {'has' if len(short) == 1 else 'have'} only "
                f"{min(counts[c] for c in short)} training images{after} but data.per_class is "
                f"{per_class}; lower data.per_class to at most {min(counts)}"
                + (" or lower data.val_size" if val_size else "")
            )
        chosen = per_class_subset(labels, per_class, split_seed, num_classes=raw.num_classes)
        pool = chosen if pool is None else pool[chosen]
    train_ds = raw.train if pool is None else raw.train.subset(pool)
    val_ds = None if val_src is None else raw.train.subset(val_src)
    test_ds = raw.test
    _warn_missing_classes(
        torch.as_tensor(test_ds.labels), names, "test split", "add test images of them"
    )
    if val_src is not None:
        _warn_missing_classes(
            all_labels[val_src],
            names,
            f"validation split (data.val_size={val_size!r})",
            "raise data.val_size so that every class is held out",
        )

    if raw.in_memory:
        transform = BatchTransform(mean, std, spec.crop_padding, spec.hflip)
    else:
        train_tf, eval_tf = build_file_transforms(spec, mean, std)
        train_ds = train_ds.with_transform(train_tf)
        test_ds = test_ds.with_transform(eval_tf)
        val_ds = None if val_ds is None else val_ds.with_transform(eval_tf)
        transform = BatchTransform(mean, std, passthrough=True)

    common: dict[str, Any] = {"seed": seed, "workers": workers, "rank": rank}
    common.update(world_size=world_size, skip_corrupt=skip_corrupt)
    train_loader = EpochLoader(
        train_ds, batch_size, shuffle=True, drop_last=drop_last, name="train", **common
    )
    test_loader = EpochLoader(
        test_ds, eval_batch_size, shuffle=False, drop_last=False, name="test", **common
    )
    val_loader = None
    if val_ds is not None:
        val_loader = EpochLoader(
            val_ds, eval_batch_size, shuffle=False, drop_last=False, name="val", **common
        )

    resolved = {
        "name": canonical,
        "root": raw.root,
        "options": dict(raw.options),
        "num_classes": raw.num_classes,
        "in_channels": raw.in_channels,
        "image_size": raw.image_size,
        "normalize": {"mean": list(mean), "std": list(std)},
        "augment": {**spec.as_dict(), "where": "device" if raw.in_memory else "loader"},
        # flat copies of the values a config needs to reproduce the run
        "mean": list(mean),
        "std": list(std),
        "crop_padding": spec.crop_padding,
        "hflip": spec.hflip,
        "per_class": per_class,
        "val_size": val_size,
        "split_seed": split_seed,
        "seed": seed,
        "batch_size": batch_size,
        "eval_batch_size": eval_batch_size,
        "drop_last": drop_last,
        "workers": workers,
        "skip_corrupt": skip_corrupt,
        "world_size": world_size,
        "sizes": {
            "train_full": n_full,
            "train": len(train_ds),
            "val": 0 if val_ds is None else len(val_ds),
            "test": len(test_ds),
        },
        "batches_per_epoch": len(train_loader),
    }
    return DataBundle(
        train_loader=train_loader,
        test_loader=test_loader,
        val_loader=val_loader,
        num_classes=raw.num_classes,
        in_channels=raw.in_channels,
        image_size=raw.image_size,
        num_train=len(train_ds),
        train_labels=train_ds.labels,
        class_names=list(raw.class_names),
        transform=transform,
        resolved=resolved,
        train_source_indices=torch.arange(n_full) if pool is None else pool,
        val_source_indices=val_src,
    )


def build_data_from_config(
    data: Any, seed: int, *, batch_size: int | None = None, rank: int = 0, world_size: int = 1
) -> DataBundle:
    """:func:`build_data` from a config's ``data`` section (:class:`selfkd.config.DataConfig`).

    ``batch_size`` overrides ``data.batch_size`` (the per-process batch under DDP).
    """
    return build_data(
        name=data.name,
        root=data.root,
        batch_size=data.batch_size if batch_size is None else batch_size,
        eval_batch_size=data.eval_batch_size,
        per_class=data.per_class,
        val_size=data.val_size,
        split_seed=data.split_seed,
        seed=seed,
        workers=data.workers,
        augment=data.augment,
        normalize=data.normalize,
        options=data.options,
        drop_last=data.drop_last,
        rank=rank,
        world_size=world_size,
        skip_corrupt=data.skip_corrupt,
        download=getattr(data, "download", False),
    )
