"""Tests of selfkd.metrics: every expected value is worked out by hand or by direct math here."""

from __future__ import annotations

import math

import pytest
import torch

from selfkd.errors import ConfigError
from selfkd.metrics import (
    LOWER_IS_BETTER,
    aurc,
    eaurc,
    ece,
    evaluate_logits,
    fit_temperature,
    macro_f1,
    nll,
    reliability_bins,
    top_k_error,
)


def _two_class(p: float) -> list[float]:
    """Logits of a 2-class sample whose softmax is (p, 1-p)."""
    return [math.log(p), math.log(1.0 - p)]


def _onehot_logits(preds: list[int], k: int) -> torch.Tensor:
    z = torch.zeros(len(preds), k)
    z[torch.arange(len(preds)), torch.tensor(preds)] = 5.0
    return z


# ------------------------------------------------------------------------------ top-k


def test_top_k_error_hand_example() -> None:
    row = [0.1, 0.5, 0.2, 0.9, 0.0, 0.3]  # class ranking: 3, 1, 5, 2, 0, 4
    logits = torch.tensor([row, row, row])
    targets = torch.tensor([3, 1, 4])
    # top-1: only sample 0 correct; top-2: samples 0, 1; top-5: samples 0, 1 (class 4 is 6th)
    assert top_k_error(logits, targets) == pytest.approx(100 * 2 / 3)
    assert top_k_error(logits, targets, k=2) == pytest.approx(100 * 1 / 3)
    assert top_k_error(logits, targets, k=5) == pytest.approx(100 * 1 / 3)
    assert top_k_error(logits, targets, k=6) == 0.0


def test_top_k_error_ties_follow_argmax() -> None:
    logits = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    targets = torch.tensor([0, 1])
    # argmax takes the first maximal index, so class 0 is predicted for both
    assert top_k_error(logits, targets, k=1) == pytest.approx(50.0)
    assert top_k_error(logits, targets, k=2) == 0.0


def test_top_k_error_rejects_k_above_num_classes() -> None:
    with pytest.raises(ConfigError):
        top_k_error(torch.zeros(2, 3), torch.tensor([0, 1]), k=4)
    with pytest.raises(ConfigError):
        top_k_error(torch.zeros(2, 3), torch.tensor([0, 1]), k=0)


# ------------------------------------------------------------------------------ macro-F1


def test_macro_f1_absent_class_and_predicted_only_class() -> None:
    # K = 5. targets contain classes 0, 1, 2; predictions contain 0, 1, 3; class 4 never occurs.
    targets = torch.tensor([0, 0, 1, 1, 2])
    preds = [0, 1, 1, 1, 3]
    logits = _onehot_logits(preds, 5)

    def f1(p: float, r: float) -> float:
        return 0.0 if p + r == 0 else 2 * p * r / (p + r)

    f1_0 = f1(1 / 1, 1 / 2)  # TP=1, FP=0, FN=1
    f1_1 = f1(2 / 3, 2 / 2)  # TP=2, FP=1, FN=0
    f1_2 = 0.0  # target only, never predicted
    f1_3 = 0.0  # predicted once, never a target
    expected = 100 * (f1_0 + f1_1 + f1_2 + f1_3) / 4  # class 4 excluded
    assert expected == pytest.approx(100 * (2 / 3 + 4 / 5) / 4)
    assert macro_f1(logits, targets) == pytest.approx(expected)
    # a larger num_classes only adds absent classes: same value
    assert macro_f1(logits, targets, num_classes=10) == pytest.approx(expected)
    with pytest.raises(ConfigError):
        macro_f1(logits, targets, num_classes=3)


def test_macro_f1_perfect() -> None:
    targets = torch.tensor([2, 0, 2, 1])
    assert macro_f1(_onehot_logits([2, 0, 2, 1], 4), targets) == pytest.approx(100.0)


# ------------------------------------------------------------------------------ NLL


def test_nll_matches_log_values() -> None:
    logits = torch.tensor([_three(0.7, 0.2, 0.1), [0.0, 0.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    expected = (-math.log(0.7) + math.log(3.0)) / 2
    assert nll(logits, targets) == pytest.approx(expected, rel=1e-12)
    assert nll(torch.zeros(3, 2), torch.tensor([0, 1, 1])) == pytest.approx(math.log(2.0))


def _three(a: float, b: float, c: float) -> list[float]:
    return [math.log(a), math.log(b), math.log(c)]


# ------------------------------------------------------------------------------ ECE / bins


def test_ece_bin_edges_by_hand() -> None:
    logits = torch.tensor([_two_class(0.6), [0.0, -1000.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1])  # sample 0 correct (conf 0.6), sample 1 wrong (conf 1.0)
    # guard: the constructed confidence is exactly on the edge 3/5
    assert torch.softmax(logits, dim=1)[0, 0].item() == 3 / 5
    b = reliability_bins(logits, targets, n_bins=5)
    assert b["lower"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert b["upper"] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert b["count"] == [0, 0, 1, 0, 1]  # 0.6 -> (0.4, 0.6]; 1.0 -> (0.8, 1.0]
    assert b["accuracy"] == pytest.approx([0.0, 0.0, 1.0, 0.0, 0.0])
    assert b["confidence"] == pytest.approx([0.0, 0.0, 0.6, 0.0, 1.0])
    # ECE = 1/2 * |1 - 0.6| + 1/2 * |0 - 1| = 0.7
    assert ece(logits, targets, n_bins=5) == pytest.approx(70.0)


def test_ece_lower_edge_is_exclusive() -> None:
    logits = torch.zeros(2, 4)  # uniform softmax: confidence exactly 1/4
    targets = torch.tensor([0, 1])  # argmax is class 0: one correct, one wrong
    assert reliability_bins(logits, targets, n_bins=4)["count"] == [2, 0, 0, 0]  # (0, 1/4]
    assert reliability_bins(logits, targets, n_bins=8)["count"] == [0, 2, 0, 0, 0, 0, 0, 0]
    # single occupied bin: |acc - conf| = |0.5 - 0.25|
    assert ece(logits, targets, n_bins=4) == pytest.approx(25.0)


def test_ece_perfectly_calibrated_is_zero() -> None:
    # five samples at confidence 0.6 with 3 correct, two at confidence 1.0 both correct
    rows = [_two_class(0.6)] * 5 + [[0.0, -1000.0]] * 2
    logits = torch.tensor(rows, dtype=torch.float64)
    targets = torch.tensor([0, 0, 0, 1, 1, 0, 0])
    assert ece(logits, targets, n_bins=5) == pytest.approx(0.0, abs=1e-9)
    assert ece(logits, targets) == pytest.approx(0.0, abs=1e-9)


def test_ece_equals_sum_over_reliability_bins() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=g) * 2
    targets = torch.randint(0, 7, (200,), generator=g)
    b = reliability_bins(logits, targets, n_bins=10)
    assert sum(b["count"]) == 200
    # independent binning of the same data
    p = torch.softmax(logits.double(), dim=1)
    conf, pred = p.max(dim=1)
    correct = (pred == targets).double()
    total = 0.0
    for m in range(1, 11):
        mask = (conf > (m - 1) / 10) & (conf <= m / 10)
        if mask.any():
            total += (
                mask.sum().item()
                / 200
                * abs(correct[mask].mean().item() - conf[mask].mean().item())
            )
    assert ece(logits, targets, n_bins=10) == pytest.approx(100 * total, abs=1e-9)


def test_bad_n_bins() -> None:
    with pytest.raises(ConfigError):
        ece(torch.zeros(2, 3), torch.tensor([0, 1]), n_bins=0)
    with pytest.raises(ConfigError):
        reliability_bins(torch.zeros(2, 3), torch.tensor([0, 1]), n_bins=0)


# ------------------------------------------------------------------------------ AURC


def test_aurc_and_eaurc_hand_example() -> None:
    # 2-class logits [a, 0]: confidence increases with a. Class 0 target = correct.
    a = [2.0, 4.0, 1.0, 3.0]
    logits = torch.tensor([[x, 0.0] for x in a])
    targets = torch.tensor([1, 0, 0, 1])  # correct: a=4, a=1; wrong: a=2, a=3
    # sorted by confidence: a=4 (ok), a=3 (err), a=2 (err), a=1 (ok)
    risks = [0 / 1, 1 / 2, 2 / 3, 2 / 4]
    expected_aurc = sum(risks) / 4  # = 5/12
    opt = (1 / 4) * (1 / (4 - 2 + 1) + 2 / (4 - 2 + 2))  # = 5/24
    assert aurc(logits, targets) == pytest.approx(1000 * 5 / 12)
    assert aurc(logits, targets) == pytest.approx(1000 * expected_aurc)
    assert eaurc(logits, targets) == pytest.approx(1000 * (expected_aurc - opt))
    assert eaurc(logits, targets) == pytest.approx(1000 * 5 / 24)


def test_eaurc_of_perfect_ranking_is_zero() -> None:
    logits = torch.tensor([[4.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    targets = torch.tensor([0, 0, 1, 1])  # the two most confident are the correct ones
    assert eaurc(logits, targets) == pytest.approx(0.0, abs=1e-9)
    assert aurc(logits, targets) == pytest.approx(1000 * (0 + 0 + 1 / 3 + 2 / 4) / 4)
    # all correct: AURC = E-AURC = 0; all wrong: AURC = 1000, E-AURC = 0
    assert aurc(logits, torch.zeros(4, dtype=torch.long)) == 0.0
    assert aurc(logits, torch.ones(4, dtype=torch.long)) == pytest.approx(1000.0)
    assert eaurc(logits, torch.ones(4, dtype=torch.long)) == pytest.approx(0.0, abs=1e-9)


def test_aurc_ties_keep_input_order() -> None:
    logits = torch.zeros(2, 2)  # equal confidence 0.5, prediction class 0
    # [wrong, correct] -> risks 1/1, 1/2; [correct, wrong] -> risks 0/1, 1/2
    assert aurc(logits, torch.tensor([1, 0])) == pytest.approx(1000 * 0.75)
    assert aurc(logits, torch.tensor([0, 1])) == pytest.approx(1000 * 0.25)


# ------------------------------------------------------------------------------ temperature


def _miscalibrated(scale: float, n: int = 4000, k: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, k, generator=g, dtype=torch.float64) * 2.5
    targets = torch.multinomial(torch.softmax(base, dim=1), 1, generator=g).squeeze(1)
    return base * scale, targets


def test_fit_temperature_recovers_scale() -> None:
    logits, targets = _miscalibrated(1 / 3)  # base logits are calibrated -> optimum T = 1/3
    logits = logits.float().requires_grad_(True)
    t = fit_temperature(logits, targets)
    assert t == pytest.approx(1 / 3, rel=0.1)
    assert logits.grad is None
    before = nll(logits, targets)
    after = nll(logits / t, targets)
    assert after <= before
    # the fitted T is a stationary point: nearby temperatures are not better
    for f in (0.9, 1.1):
        assert nll(logits / (t * f), targets) >= after


def test_fit_temperature_overconfident_side() -> None:
    logits, targets = _miscalibrated(2.0, seed=1)
    assert fit_temperature(logits, targets) == pytest.approx(2.0, rel=0.1)


def test_fit_temperature_under_inference_mode() -> None:
    with torch.inference_mode():
        logits, targets = _miscalibrated(0.5, n=1000, seed=2)
        assert fit_temperature(logits, targets) == pytest.approx(0.5, rel=0.15)
    with torch.no_grad():
        assert fit_temperature(logits, targets) == pytest.approx(0.5, rel=0.15)


def test_fit_temperature_unbounded_optima() -> None:
    targets = torch.tensor([0, 1, 2, 1])
    # all wrong with a margin: NLL decreases towards log K as T -> inf, so T hits the clamp
    wrong = _onehot_logits(((targets + 1) % 3).tolist(), 3)
    assert fit_temperature(wrong, targets) == pytest.approx(20.0)
    # all right: NLL -> 0 as T -> 0; LBFGS stops once the NLL is flat, well below T = 1
    right = _onehot_logits(targets.tolist(), 3)
    t = fit_temperature(right, targets)
    assert 0.05 <= t < 0.5
    assert nll(right / t, targets) < 1e-3 * nll(right, targets)


# ------------------------------------------------------------------------------ evaluate_logits


BASE_KEYS = {"top1_err", "macro_f1", "nll", "ece", "ece10", "aurc", "eaurc"}
TS_KEYS = {"nll_ts", "ece_ts", "ece10_ts", "aurc_ts", "eaurc_ts", "temperature"}


def test_evaluate_logits_keys() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 10, generator=g)
    targets = torch.randint(0, 10, (50,), generator=g)
    out = evaluate_logits(logits, targets)
    assert set(out) == BASE_KEYS | {"top5_err"}
    assert all(isinstance(v, float) for v in out.values())
    out_ts = evaluate_logits(logits, targets, temperature=2.0)
    assert set(out_ts) == BASE_KEYS | {"top5_err"} | TS_KEYS
    assert out_ts["temperature"] == 2.0
    assert set(out_ts) - {"temperature"} == set(LOWER_IS_BETTER)
    assert LOWER_IS_BETTER["macro_f1"] is False
    assert all(v for k, v in LOWER_IS_BETTER.items() if k != "macro_f1")
    # _ts metrics are the plain ones on logits / T
    assert out_ts["nll_ts"] == pytest.approx(nll(logits / 2.0, targets))
    assert out_ts["ece_ts"] == pytest.approx(ece(logits / 2.0, targets))
    assert out_ts["ece10_ts"] == pytest.approx(ece(logits / 2.0, targets, n_bins=10))
    assert out_ts["aurc_ts"] == pytest.approx(aurc(logits / 2.0, targets))
    assert out_ts["eaurc_ts"] == pytest.approx(eaurc(logits / 2.0, targets))
    assert out["ece10"] == pytest.approx(ece(logits, targets, n_bins=10))
    # K < 5: no top5_err
    assert set(evaluate_logits(logits[:, :3], targets % 3)) == BASE_KEYS


def test_evaluate_logits_hand_values() -> None:
    logits = torch.tensor([_two_class(0.6), [0.0, -1000.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1])
    out = evaluate_logits(logits, targets)
    assert out["top1_err"] == pytest.approx(50.0)
    assert out["nll"] == pytest.approx((-math.log(0.6) + 1000.0) / 2)
    assert out["ece10"] == pytest.approx(70.0)  # 0.6 -> (0.5, 0.6], 1.0 -> (0.9, 1.0]
    # sorted: conf 1.0 (err), 0.6 (ok): risks 1, 1/2; optimum with r=1, n=2: (1/2)(1/2)
    assert out["aurc"] == pytest.approx(1000 * 0.75)
    assert out["eaurc"] == pytest.approx(1000 * 0.5)
    # class 0: TP=1, FP=1, FN=0 -> F1=2/3; class 1: TP=0 -> 0
    assert out["macro_f1"] == pytest.approx(100 * (2 / 3) / 2)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("logits", "targets"),
    [
        (torch.zeros(3, 4), torch.tensor([0, 1])),  # shape mismatch
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),  # empty
        (torch.zeros(4), torch.tensor([0, 1, 2, 3])),  # logits not 2-D
        (torch.zeros(2, 4), torch.tensor([[0], [1]])),  # targets not 1-D
        (torch.zeros(2, 4), torch.tensor([0.0, 1.0])),  # float targets
        (torch.zeros(2, 4), torch.tensor([0, 4])),  # target out of range
        (torch.zeros(2, 4), torch.tensor([-1, 0])),  # negative target
        (torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), torch.tensor([0, 1])),  # NaN
        (torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 1])),  # integer logits
    ],
)
def test_bad_input_raises_config_error(logits: torch.Tensor, targets: torch.Tensor) -> None:
    for fn in (top_k_error, macro_f1, nll, ece, reliability_bins, aurc, eaurc, evaluate_logits):
        with pytest.raises(ConfigError):
            fn(logits, targets)
    with pytest.raises(ConfigError):
        fit_temperature(logits, targets)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), "x"])
def test_bad_temperature(temperature: object) -> None:
    with pytest.raises(ConfigError):
        evaluate_logits(torch.zeros(2, 3), torch.tensor([0, 1]), temperature=temperature)


def test_bad_max_iter() -> None:
    with pytest.raises(ConfigError):
        fit_temperature(torch.zeros(2, 3), torch.tensor([0, 1]), max_iter=0)
