"""The dataset registry.

Each entry is a function ``(root: str | None, **options) -> RawSplits`` registered in
:data:`DATASETS`; its first docstring line is what ``selfkd list`` shows. Entries validate their
options with :func:`check_options` (unknown options are a ConfigError listing the accepted ones).
The built-in entries (cifar10, cifar100, fashion-mnist, mnist, imagefolder, synthetic,
tiny-imagenet, imagenet, cub200, stanford-dogs, mit67, fgvc-aircraft, caltech101) register
themselves when :mod:`selfkd.data` is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from selfkd.data.base import RawSplits
from selfkd.errors import ConfigError
from selfkd.registry import Registry, close_matches

DatasetFactory = Callable[..., RawSplits]

DATASETS: Registry[DatasetFactory] = Registry("dataset")


def check_options(
    dataset: str, options: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """``defaults`` updated with ``options``; ConfigError for an option not in ``defaults``."""
    unknown = [k for k in options if k not in defaults]
    if unknown:
        key = unknown[0]
        accepted = ", ".join(sorted(defaults)) or "none"
        raise ConfigError(
            f"unknown option {key!r} for dataset {dataset!r}"
            f"{close_matches(str(key), list(defaults))}; accepted data.options: {accepted}"
        )
    return {**defaults, **options}
