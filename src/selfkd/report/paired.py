"""Paired statistics over seeds: the mean difference of a method to a baseline on the same seeds,
its Student-t confidence interval, and the number of seeds on which the method wins.

Pure functions, no dependencies: the t distribution's CDF for an integer number of degrees of
freedom has a closed form as a finite sum (Abramowitz & Stegun 26.7.3 and 26.7.4), and its
quantile is found by bisection on that CDF, so no scipy is needed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def _central_probability(t: float, dof: int) -> float:
    """P(|T| <= t) for T ~ Student t with ``dof`` degrees of freedom, ``t >= 0``."""
    theta = math.atan(t / math.sqrt(dof))
    s, c = math.sin(theta), math.cos(theta)
    c2 = c * c
    if dof % 2 == 1:
        # (2/pi) {theta + sin(theta) [cos + (2/3) cos^3 + ... + (2.4...(dof-3))/(1.3...(dof-2))
        # cos^(dof-2)]}, the bracket empty for dof = 1
        total, term = 0.0, c
        for j in range(1, (dof - 1) // 2 + 1):
            total += term
            term *= (2 * j) / (2 * j + 1) * c2
        return min(1.0, (2 / math.pi) * (theta + s * total))
    # sin(theta) [1 + (1/2) cos^2 + (1.3)/(2.4) cos^4 + ... + (1.3...(dof-3))/(2.4...(dof-2))
    # cos^(dof-2)]
    total, term = 0.0, 1.0
    for j in range(1, dof // 2 + 1):
        total += term
        term *= (2 * j - 1) / (2 * j) * c2
    return min(1.0, s * total)


def _check_dof(dof: int) -> None:
    if isinstance(dof, bool) or not isinstance(dof, int) or dof < 1:
        raise ValueError(f"degrees of freedom must be a positive integer, got {dof!r}")


def t_cdf(t: float, dof: int) -> float:
    """The CDF of Student's t distribution with an integer number ``dof`` of degrees of freedom."""
    _check_dof(dof)
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    half = 0.5 * _central_probability(abs(t), dof)
    return 0.5 + half if t >= 0 else 0.5 - half


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t distribution with ``dof`` degrees of freedom."""
    _check_dof(dof)
    if not 0 < p < 1:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1 - p, dof)
    target = 2 * p - 1  # P(|T| <= t) at the quantile
    lo, hi = 0.0, 1.0
    while _central_probability(hi, dof) < target:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _central_probability(mid, dof) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class PairedDifference:
    """``mean`` of (method - baseline) over ``n`` paired seeds, its ``level`` t-interval
    [``low``, ``high``] (NaN for one pair), and on how many seeds the method is better
    (``wins``) or equal (``ties``)."""

    n: int
    mean: float
    low: float
    high: float
    wins: int
    ties: int
    level: float = 0.95


def paired_difference(
    method: Sequence[float],
    baseline: Sequence[float],
    *,
    lower_is_better: bool,
    level: float = 0.95,
) -> PairedDifference:
    """Paired comparison of ``method`` with ``baseline``; element i of both is the same seed.

    The interval is mean ± t_{(1+level)/2, n-1} · s / sqrt(n), with s the sample standard
    deviation of the differences (n - 1 in the denominator).
    """
    if len(method) != len(baseline):
        raise ValueError(
            f"paired values need the same number of seeds, got {len(method)} and {len(baseline)}"
        )
    if not method:
        raise ValueError("paired values need at least one seed")
    if not 0 < level < 1:
        raise ValueError(f"the interval level must be in (0, 1), got {level!r}")
    diffs = [float(m) - float(b) for m, b in zip(method, baseline, strict=True)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n > 1:
        half = t_quantile((1 + level) / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
        low, high = mean - half, mean + half
    else:
        low = high = math.nan
    better = [d < 0 if lower_is_better else d > 0 for d in diffs]
    return PairedDifference(
        n=n,
        mean=mean,
        low=low,
        high=high,
        wins=sum(better),
        ties=sum(d == 0 for d in diffs),
        level=level,
    )
