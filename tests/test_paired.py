"""Paired statistics (selfkd.report.paired) against numbers computed by hand in each test."""

from __future__ import annotations

import math

import pytest

from selfkd.report.paired import paired_difference, t_cdf, t_quantile


def test_t_quantile_matches_closed_forms():
    for p in (0.6, 0.9, 0.975, 0.995):
        # one degree of freedom is the Cauchy distribution: tan(pi (p - 1/2))
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)
        # two: (2p - 1) / sqrt(2 p (1 - p))
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)))
        # four: 2 sqrt(q - 1) with q = cos(arccos(sqrt(a)) / 3) / sqrt(a), a = 4 p (1 - p)
        a = 4 * p * (1 - p)
        q = math.cos(math.acos(math.sqrt(a)) / 3) / math.sqrt(a)
        assert t_quantile(p, 4) == pytest.approx(2 * math.sqrt(q - 1), rel=1e-10)
        assert t_quantile(1 - p, 4) == pytest.approx(-2 * math.sqrt(q - 1), rel=1e-10)
    # the table values everyone knows (two-sided 95 %)
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(0.975, 9) == pytest.approx(2.2622, abs=1e-4)
    assert t_quantile(0.975, 29) == pytest.approx(2.0452, abs=1e-4)
    assert t_quantile(0.5, 7) == 0.0


def test_t_cdf_matches_closed_forms():
    for t in (-4.0, -0.7, 0.0, 0.3, 2.5, 30.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-14)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-14)
        x = t / math.sqrt(3)
        three = 0.5 + (x / (1 + x * x) + math.atan(x)) / math.pi
        assert t_cdf(t, 3) == pytest.approx(three, abs=1e-14)
    # many degrees of freedom: close to the normal distribution
    assert t_cdf(1.96, 100_000) == pytest.approx(0.5 * (1 + math.erf(1.96 / math.sqrt(2))), 1e-4)
    for dof in (3, 8, 31):
        assert t_cdf(t_quantile(0.975, dof), dof) == pytest.approx(0.975, abs=1e-12)


def test_t_against_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for dof in (1, 2, 3, 5, 10, 57, 400):
        for p in (0.55, 0.95, 0.975, 0.999):
            assert t_quantile(p, dof) == pytest.approx(stats.t.ppf(p, dof), rel=1e-9)


def test_paired_difference_by_hand():
    method, baseline = [10.0, 12.0, 11.0], [11.0, 12.5, 13.0]
    # differences -1, -0.5, -2: mean -7/6, sample variance ((1/6)^2 + (2/3)^2 + (5/6)^2) / 2
    mean = -7 / 6
    sd = math.sqrt(((1 / 6) ** 2 + (2 / 3) ** 2 + (5 / 6) ** 2) / 2)
    t = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t_{0.975, 2}, closed form
    half = t * sd / math.sqrt(3)
    p = paired_difference(method, baseline, lower_is_better=True)
    assert p.n == 3 and p.mean == pytest.approx(mean)
    assert (p.low, p.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert (p.low, p.high) == (pytest.approx(-3.06396, abs=1e-5), pytest.approx(0.73063, abs=1e-5))
    assert (p.wins, p.ties) == (3, 0)  # lower is better: the method wins every seed
    up = paired_difference(method, baseline, lower_is_better=False)
    assert (up.wins, up.mean) == (0, pytest.approx(mean))  # higher is better: it loses all

    ties = paired_difference([1.0, 2.0, 3.0], [1.0, 1.0, 4.0], lower_is_better=True)
    assert (ties.wins, ties.ties, ties.mean) == (1, 1, pytest.approx(0.0))

    one = paired_difference([5.0], [7.5], lower_is_better=True)
    assert (one.n, one.mean, one.wins) == (1, -2.5, 1)
    assert math.isnan(one.low) and math.isnan(one.high)  # one pair: no interval


def test_paired_difference_bad_input():
    with pytest.raises(ValueError, match="same number of seeds, got 2 and 1"):
        paired_difference([1.0, 2.0], [1.0], lower_is_better=True)
    with pytest.raises(ValueError, match="at least one seed"):
        paired_difference([], [], lower_is_better=True)
    with pytest.raises(ValueError, match="positive integer"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 3)
