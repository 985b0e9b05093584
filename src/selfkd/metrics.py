"""Classification metrics computed from logits.

Every public function takes ``logits`` (an ``N×K`` floating tensor) and ``targets`` (an ``N``
integer tensor of class indices in ``[0, K)``) on any device and returns plain Python numbers.
Nothing is differentiated: inputs are detached and the arithmetic is done in float64 (the heavy
``N×K`` part on the tensors' device; the per-sample ``N``-vectors are moved to the CPU for
binning and sorting, which keeps the results deterministic on every backend).

Conventions shared by all functions:

* prediction ``ŷ_i = argmax_j z_ij``, ties going to the lowest class index (so ``top1_err``,
  macro-F1, ECE and AURC all agree on which samples are correct);
* confidence ``c_i = max_j softmax(z_i)_j``;
* errors, F1 and ECE are in percent; AURC and E-AURC are multiplied by 1000 (as in the PS-KD
  and CRL papers' tables); NLL is in nats.

Bad input (not a tensor, wrong rank, shape mismatch, empty, non-finite logits, targets out of
range, ``k > K``, ``n_bins < 1``, ...) raises :class:`selfkd.errors.ConfigError`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from selfkd.errors import ConfigError

__all__ = [
    "LOWER_IS_BETTER",
    "aurc",
    "eaurc",
    "ece",
    "evaluate_logits",
    "fit_temperature",
    "macro_f1",
    "nll",
    "reliability_bins",
    "top_k_error",
]

#: For every key :func:`evaluate_logits` can return (except ``temperature``): whether a smaller
#: value is better. Used by the training engine to pick the best checkpoint.
LOWER_IS_BETTER: dict[str, bool] = {
    "top1_err": True,
    "top5_err": True,
    "macro_f1": False,
    "nll": True,
    "ece": True,
    "ece10": True,
    "aurc": True,
    "eaurc": True,
    "nll_ts": True,
    "ece_ts": True,
    "ece10_ts": True,
    "aurc_ts": True,
    "eaurc_ts": True,
}

#: Bounds that :func:`fit_temperature` clamps its result to.
T_MIN = 0.05
T_MAX = 20.0


# --------------------------------------------------------------------------------------------
# input checking and shared per-sample quantities
# --------------------------------------------------------------------------------------------


def _check(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Validate inputs; return detached float64 logits and int64 targets on the logits' device."""
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
        raise ConfigError("logits and targets must be torch tensors")
    if logits.ndim != 2:
        raise ConfigError(f"logits must be 2-D (N×K), got shape {tuple(logits.shape)}")
    if targets.ndim != 1:
        raise ConfigError(f"targets must be 1-D (N), got shape {tuple(targets.shape)}")
    n, k = logits.shape
    if targets.shape[0] != n:
        raise ConfigError(
            f"shape mismatch: logits have {n} rows but targets have {targets.shape[0]} entries"
        )
    if n == 0 or k == 0:
        raise ConfigError(f"empty input: logits have shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ConfigError(f"logits must be a floating tensor, got {logits.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ConfigError(f"targets must be an integer tensor, got {targets.dtype}")
    z = logits.detach().to(torch.float64)
    if not bool(torch.isfinite(z).all()):
        raise ConfigError("logits contain NaN or infinite values")
    t = targets.detach().to(device=z.device, dtype=torch.long)
    t_min, t_max = int(t.min()), int(t.max())
    if t_min < 0 or t_max >= k:
        raise ConfigError(f"targets must lie in [0, {k - 1}], got values in [{t_min}, {t_max}]")
    return z, t


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ConfigError(f"n_bins must be an integer >= 1, got {n_bins!r}")


def _conf_correct(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Max-softmax confidence (float64) and correctness (bool) per sample, both on the CPU."""
    conf = torch.softmax(z, dim=1).amax(dim=1)
    correct = z.argmax(dim=1) == t
    return conf.cpu(), correct.cpu()


def _bins(conf: Tensor, correct: Tensor, n_bins: int) -> dict[str, list]:
    """Equal-width binning of confidences into ``((m-1)/M, m/M]`` (the one implementation)."""
    m = n_bins
    upper = torch.arange(1, m + 1, dtype=torch.float64) / m
    lower = torch.arange(0, m, dtype=torch.float64) / m
    # bucketize(right=False) returns i with b[i-1] < c <= b[i]: lower edge exclusive, upper
    # inclusive; c <= 1/M (including c == 0) lands in bin 0, c > (M-1)/M in bin M-1.
    idx = torch.bucketize(conf, upper[:-1], right=False)
    count = torch.bincount(idx, minlength=m)
    n_correct = torch.bincount(idx, weights=correct.to(torch.float64), minlength=m)
    conf_sum = torch.bincount(idx, weights=conf, minlength=m)
    denom = count.clamp(min=1).to(torch.float64)
    return {
        "lower": lower.tolist(),
        "upper": upper.tolist(),
        "count": count.tolist(),
        "accuracy": (n_correct / denom).tolist(),
        "confidence": (conf_sum / denom).tolist(),
    }


def _ece_from(conf: Tensor, correct: Tensor, n_bins: int) -> float:
    b = _bins(conf, correct, n_bins)
    n = conf.numel()
    total = sum(
        c / n * abs(a - p)
        for c, a, p in zip(b["count"], b["accuracy"], b["confidence"], strict=True)
    )
    return 100.0 * total


def _aurc_eaurc_from(conf: Tensor, correct: Tensor) -> tuple[float, float]:
    """(AURC, E-AURC), both ×1000, from per-sample confidence and correctness."""
    n = conf.numel()
    order = torch.sort(conf, descending=True, stable=True).indices
    wrong = (~correct[order]).to(torch.float64)
    risks = torch.cumsum(wrong, dim=0) / torch.arange(1, n + 1, dtype=torch.float64)
    area = float(risks.mean())
    r = int((~correct).sum())
    i = torch.arange(1, r + 1, dtype=torch.float64)
    optimum = float((i / (n - r + i)).sum()) / n
    return 1000.0 * area, 1000.0 * (area - optimum)


# --------------------------------------------------------------------------------------------
# public metrics
# --------------------------------------------------------------------------------------------


def top_k_error(logits: Tensor, targets: Tensor, k: int = 1) -> float:
    """Top-k error in percent: ``100 · (1/N) Σ_i [y_i ∉ top-k(z_i)]``.

    The rank of the target is ``#{j : z_ij > z_iy} + #{j < y : z_ij = z_iy}`` (ties ordered by
    class index, matching ``argmax``); a sample counts as correct when that rank is ``< k``.
    """
    z, t = _check(logits, targets)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be an integer >= 1, got {k!r}")
    num_classes = z.shape[1]
    if k > num_classes:
        raise ConfigError(f"k={k} exceeds the number of classes K={num_classes}")
    zy = z.gather(1, t[:, None])
    cols = torch.arange(num_classes, device=z.device)[None, :]
    rank = (z > zy).sum(dim=1) + ((z == zy) & (cols < t[:, None])).sum(dim=1)
    return 100.0 * float((rank >= k).to(torch.float64).mean())


def macro_f1(logits: Tensor, targets: Tensor, num_classes: int | None = None) -> float:
    """Macro-averaged F1 in percent, predictions being ``argmax`` of the logits.

    Per class ``c``: ``P = TP/(TP+FP)``, ``R = TP/(TP+FN)``,
    ``F1_c = 2PR/(P+R) = 2·TP / (2·TP + FP + FN)``, taken as 0 when ``TP = 0``.
    ``macro_f1 = 100 · mean_{c ∈ S} F1_c`` where ``S`` is the set of classes that occur among
    the targets or the predictions. A class absent from both is excluded from the average (its
    F1 is undefined); a class that occurs but is never correctly predicted (e.g. predicted but
    never a target) counts with F1 = 0.

    ``num_classes`` defaults to ``logits.shape[1]`` and may not be smaller than it; because the
    average is over occurring classes, a larger value does not change the result.
    """
    z, t = _check(logits, targets)
    k = z.shape[1]
    if num_classes is None:
        num_classes = k
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < k:
        raise ConfigError(f"num_classes must be an integer >= K={k}, got {num_classes!r}")
    pred = z.argmax(dim=1).cpu()
    t = t.cpu()
    tp = torch.bincount(t[pred == t], minlength=num_classes).to(torch.float64)
    n_pred = torch.bincount(pred, minlength=num_classes).to(torch.float64)
    n_true = torch.bincount(t, minlength=num_classes).to(torch.float64)
    denom = n_pred + n_true  # = 2TP + FP + FN
    present = denom > 0
    f1 = 2.0 * tp[present] / denom[present]
    return 100.0 * float(f1.mean())


def nll(logits: Tensor, targets: Tensor) -> float:
    """Mean negative log-likelihood in nats: ``(1/N) Σ_i −log softmax(z_i)_{y_i}``."""
    z, t = _check(logits, targets)
    return float(F.cross_entropy(z, t, reduction="mean"))


def reliability_bins(logits: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, list]:
    """Per-bin statistics for a reliability diagram.

    Bins ``B_m = ((m−1)/M, m/M]`` for ``m = 1..M`` (lower edge exclusive, upper inclusive; a
    confidence exactly ``m/M`` goes to bin ``m``, a confidence of 0 to the first bin). Returns
    lists of length ``M``: ``lower``, ``upper`` (bin edges), ``count`` (``|B_m|``),
    ``accuracy`` (fraction correct in ``B_m``, in [0, 1]) and ``confidence`` (mean max-softmax
    in ``B_m``); ``accuracy`` and ``confidence`` are 0.0 for empty bins (``count`` 0).
    """
    z, t = _check(logits, targets)
    _check_n_bins(n_bins)
    conf, correct = _conf_correct(z, t)
    return _bins(conf, correct, n_bins)


def ece(logits: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error in percent with ``M = n_bins`` equal-width bins.

    ``ECE = 100 · Σ_m |B_m|/N · |acc(B_m) − conf(B_m)|`` over the bins of
    :func:`reliability_bins` (``((m−1)/M, m/M]``); empty bins contribute 0.
    """
    z, t = _check(logits, targets)
    _check_n_bins(n_bins)
    conf, correct = _conf_correct(z, t)
    return _ece_from(conf, correct, n_bins)


def aurc(logits: Tensor, targets: Tensor) -> float:
    """Area under the risk-coverage curve, ×1000.

    Samples are sorted by max-softmax confidence, descending (stable sort: ties keep their input
    order). With ``R_k`` = (errors among the first ``k``)/``k``,
    ``AURC = 1000 · (1/N) Σ_{k=1..N} R_k``.
    """
    z, t = _check(logits, targets)
    conf, correct = _conf_correct(z, t)
    return _aurc_eaurc_from(conf, correct)[0]


def eaurc(logits: Tensor, targets: Tensor) -> float:
    """Excess AURC, ×1000: ``E-AURC = AURC − AURC*``.

    ``AURC*`` is the AURC of an ideal ranking (all correct samples first) with the same number
    of errors ``r``, in its exact discrete form
    ``AURC* = (1/N) Σ_{i=1..r} i / (N − r + i)``. This is the choice of the official PS-KD code
    (``utils/metric.py``); the other one in the literature is the continuous approximation
    ``r̂ + (1 − r̂) ln(1 − r̂)`` with ``r̂ = r/N``. A perfect ranking gives exactly 0.
    """
    z, t = _check(logits, targets)
    conf, correct = _conf_correct(z, t)
    return _aurc_eaurc_from(conf, correct)[1]


def fit_temperature(logits: Tensor, targets: Tensor, max_iter: int = 100) -> float:
    """Fit one temperature ``T > 0`` minimising ``(1/N) Σ_i −log softmax(z_i / T)_{y_i}``.

    Must be fitted on a held-out (validation) split, never on the test set whose metrics are
    reported. Optimised with ``torch.optim.LBFGS`` (``line_search_fn="strong_wolfe"``,
    ``max_iter`` iterations) over ``log T`` starting at ``T = 1.5``, in float64 on the CPU on a
    detached copy (no gradient reaches the inputs). The result is clamped to
    ``[0.05, 20]``: the optimum is unbounded when every sample is classified correctly
    (``T → 0``; LBFGS then stops where the NLL has become flat) or when the logits carry no
    signal or the wrong one (``T → ∞``). Should the optimisation end non-finite, the best of
    ``T ∈ {0.05, 1, 20}`` is returned.
    """
    z, t = _check(logits, targets)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    # Autograd must work even when called under no_grad() or inference_mode(); clone() outside
    # inference mode turns possible inference tensors into ordinary ones.
    with torch.inference_mode(False), torch.enable_grad():
        z = z.cpu().clone()
        t = t.cpu().clone()
        log_t = torch.tensor(math.log(1.5), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z * torch.exp(-log_t), t)
            loss.backward()
            return loss

        opt.step(closure)
        temperature = math.exp(float(log_t.detach()))
    if not math.isfinite(temperature):
        with torch.no_grad():
            temperature = min((T_MIN, 1.0, T_MAX), key=lambda tt: float(F.cross_entropy(z / tt, t)))
    return min(max(temperature, T_MIN), T_MAX)


def evaluate_logits(
    logits: Tensor, targets: Tensor, temperature: float | None = None
) -> dict[str, float]:
    """All metrics of a set of logits, as a flat dict of floats.

    Keys: ``top1_err``, ``top5_err`` (only when K ≥ 5), ``macro_f1``, ``nll``, ``ece``
    (15 bins), ``ece10`` (10 bins, as in the PS-KD tables), ``aurc``, ``eaurc``. When
    ``temperature`` is given (fitted beforehand on a held-out split with
    :func:`fit_temperature`), the calibration metrics are also computed on ``logits / T``:
    ``nll_ts``, ``ece_ts``, ``ece10_ts``, ``aurc_ts``, ``eaurc_ts``, plus ``temperature``.
    Top-k errors and macro-F1 do not depend on ``T > 0``, so they have no ``_ts`` variant.
    :data:`LOWER_IS_BETTER` says in which direction each key improves.
    """
    z, t = _check(logits, targets)
    if temperature is not None:
        if isinstance(temperature, bool):
            raise ConfigError(f"temperature must be a number, got {temperature!r}")
        try:
            temperature = float(temperature)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(f"temperature must be a number, got {temperature!r}") from None
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature must be finite and > 0, got {temperature!r}")

    out: dict[str, float] = {"top1_err": top_k_error(z, t, k=1)}
    if z.shape[1] >= 5:
        out["top5_err"] = top_k_error(z, t, k=5)
    out["macro_f1"] = macro_f1(z, t)

    def calibration(zz: Tensor, suffix: str) -> None:
        conf, correct = _conf_correct(zz, t)
        out["nll" + suffix] = float(F.cross_entropy(zz, t))
        out["ece" + suffix] = _ece_from(conf, correct, 15)
        out["ece10" + suffix] = _ece_from(conf, correct, 10)
        out["aurc" + suffix], out["eaurc" + suffix] = _aurc_eaurc_from(conf, correct)

    calibration(z, "")
    if temperature is not None:
        calibration(z / temperature, "_ts")
        out["temperature"] = temperature
    return out
