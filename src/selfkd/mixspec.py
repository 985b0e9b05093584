"""The ``data.mix`` section as a typed spec, and the rule that says which methods may take it.

Parsed once, when the config is validated (:attr:`selfkd.config.DataConfig.mix_spec`); the
augmentation itself is :class:`selfkd.data.mixing.Mixer`, built from the spec, and the engine asks
the methods' side (:func:`selfkd.methods.base.mix_split`) whether a method takes it whole, split
or not at all. A leaf: it imports only :mod:`selfkd.schema`, :mod:`selfkd.errors` and
:mod:`selfkd.registry`. Keys: ``name`` (cutout | mixup | cutmix; none/off = no mixing), ``alpha``
(mixup/cutmix), ``size`` (cutout), ``prob`` and ``split`` (null = by the method).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from selfkd.errors import ConfigError
from selfkd.registry import close_matches
from selfkd.schema import build_dataclass

__all__ = ["MIXES", "MIXING_MODES", "OFF", "MixSpec", "check_mix_values", "parse_mix", "split_rule"]

MIXES = ("cutout", "mixup", "cutmix")
#: values of ``Method.mixing``: cannot take mixed labels / whole batch / the split rule
MIXING_MODES = ("none", "full", "split")
#: names that switch mixing off (``--set data.mix.name=none``)
OFF = ("none", "off")


@dataclass
class MixSpec:
    """The ``data.mix`` section (see :mod:`selfkd.data.mixing`)."""

    name: str = ""
    alpha: float = 1.0
    size: int | None = None
    prob: float = 1.0
    #: None = by the method (the papers' split rule for methods whose ``mixing`` is "split")
    split: bool | None = None

    @property
    def changes_labels(self) -> bool:
        """Whether the augmentation mixes labels (mixup, cutmix) or keeps them (cutout)."""
        return self.name != "cutout"


def check_mix_values(name: str, alpha: float, size: int | None, prob: float) -> None:
    """Range checks of a mix's values; ConfigError naming the key."""
    if name not in MIXES:
        raise ConfigError(
            f"data.mix.name must be one of {', '.join(MIXES)}, got {name!r}"
            f"{close_matches(str(name), list(MIXES))}"
        )
    if not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"data.mix.alpha must be > 0 (Beta(alpha, alpha)), got {alpha}")
    if not math.isfinite(prob) or not 0.0 <= prob <= 1.0:
        raise ConfigError(f"data.mix.prob must be in [0, 1], got {prob}")
    if size is not None and size < 1:
        raise ConfigError(f"data.mix.size must be at least 1 pixel, got {size}")


def parse_mix(section: dict[str, Any] | None) -> MixSpec | None:
    """The ``data.mix`` mapping as a checked :class:`MixSpec`; None when empty or ``none``.

    Unknown keys and values raise ConfigError with close matches; keys that do not apply
    (``size`` for mixup/cutmix, ``alpha`` for cutout) are refused too.
    """
    if not section:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"data.mix must be a mapping like {{name: cutmix}}, got {section!r}")
    spec = build_dataclass(MixSpec, section, "data.mix")
    if spec.name in OFF:
        return None
    if not spec.name:
        raise ConfigError(f"data.mix needs a name: one of {', '.join(MIXES)}")
    if spec.name not in MIXES:
        raise ConfigError(
            f"unknown data.mix.name {spec.name!r}{close_matches(spec.name, list(MIXES))}; "
            f"known: {', '.join(MIXES)}"
        )
    if spec.name == "cutout" and "alpha" in section:
        raise ConfigError("data.mix.alpha applies to mixup and cutmix, not cutout")
    if spec.name != "cutout" and section.get("size") is not None:
        raise ConfigError(f"data.mix.size applies to cutout only, not {spec.name}")
    check_mix_values(spec.name, spec.alpha, spec.size, spec.prob)
    return spec


def split_rule(spec: MixSpec, method: str, mixing: str, able: Sequence[str] | None = None) -> bool:
    """Whether a method whose ``Method.mixing`` is ``mixing`` gets split batches.

    ConfigError when the method cannot take this augmentation: ``mixing`` "none" with mixup or
    cutmix (no loss for mixed labels; ``able`` names the methods that can), or "split" with
    ``split: false``.
    """
    if mixing not in MIXING_MODES:
        raise ValueError(f"Method.mixing must be one of {', '.join(MIXING_MODES)}, got {mixing!r}")
    if spec.changes_labels and mixing == "none":
        works = f"{spec.name} works with {', '.join(able)}; " if able is not None else ""
        raise ConfigError(
            f"method {method} cannot take data.mix={spec.name} (it has no loss for mixed "
            f"labels; {works}cutout works with every method); drop data.mix or use cutout"
        )
    split = spec.split if spec.split is not None else mixing == "split"
    if spec.changes_labels and mixing == "split" and not split:
        raise ConfigError(
            f"method {method} takes data.mix={spec.name} only under the papers' split rule "
            "(half the batch mixed, half with the method's own targets); set "
            "data.mix.split=true or leave it out"
        )
    return split
