"""ZF-LS: dense votes, min-ranks, Zipf targets and loss by hand, gradient flow, end to end."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

import selfkd.methods.zfls  # noqa: F401  (registers the method)
from helpers import assert_resume_is_exact
from selfkd.config import load_config
from selfkd.errors import ConfigError, ModelError
from selfkd.losses.zfls import (
    dense_votes,
    min_ranks,
    vote_counts,
    zfls_loss,
    zipf_kl,
    zipf_targets,
)
from selfkd.methods.base import Batch, MethodContext, StepInfo, build_method

INFO = StepInfo(epoch=0, step=0, global_step=0, epochs=1, steps_per_epoch=1)


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _np_zipf_loss(z: np.ndarray, y: np.ndarray, counts: np.ndarray, lam: float) -> float:
    """Independent reference: loops, min-rank by definition, softmax over non-targets."""
    total_kl = 0.0
    for b in range(z.shape[0]):
        s = counts[b]
        r = np.array([1 + sum(s[j] > s[k] for j in range(len(s))) for k in range(len(s))])
        others = [k for k in range(len(s)) if k != y[b]]
        w = 1.0 / r[others]
        pi = w / w.sum()
        log_q = _np_log_softmax(z[b, others])
        total_kl += float(np.sum(pi * (np.log(pi) - log_q)))
    ce = -np.mean(_np_log_softmax(z)[np.arange(len(y)), y])
    return ce + lam * total_kl / z.shape[0]


# --- pieces ---------------------------------------------------------------------------------
def test_min_ranks_with_ties_by_hand() -> None:
    s = torch.tensor([[3.0, 1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 7.0]])
    assert min_ranks(s).tolist() == [[1, 3, 1, 4, 4], [2, 2, 2, 2, 1]]
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 4, (6, 9), generator=g).float()
    brute = 1 + (r[:, None, :] > r[:, :, None]).sum(-1)
    assert torch.equal(min_ranks(r), brute.float())


def test_zipf_targets_by_hand() -> None:
    counts = torch.tensor([[3.0, 1.0, 3.0, 0.0, 0.0]])
    pi = zipf_targets(counts, torch.tensor([0]))
    # ranks 1,3,1,4,4 -> w = 1, 1/3, 1, 1/4, 1/4; drop the target (class 0): sum 11/6
    expected = [0.0, 2 / 11, 6 / 11, 3 / 22, 3 / 22]
    assert pi[0].tolist() == pytest.approx(expected, rel=1e-6)
    # power 2: w = 1/9, 1, 1/16, 1/16 over non-targets
    pi2 = zipf_targets(counts, torch.tensor([0]), power=2.0)
    w = np.array([1 / 9, 1, 1 / 16, 1 / 16])
    assert pi2[0, 1:].tolist() == pytest.approx((w / w.sum()).tolist(), rel=1e-6)


def test_all_votes_on_target_give_uniform_non_target_targets() -> None:
    votes = torch.full((2, 16), 2)
    counts = vote_counts(votes, 4)
    assert counts.tolist() == [[0, 0, 16, 0], [0, 0, 16, 0]]
    pi = zipf_targets(counts, torch.tensor([2, 2]))
    expected = torch.tensor([[1 / 3, 1 / 3, 0, 1 / 3]] * 2)
    assert torch.allclose(pi, expected, atol=1e-7)


def test_dense_votes_and_counts_by_hand() -> None:
    # one sample, 2 channels, a 1x2 map: position vectors a=(1,0) and b=(0,2)
    a, b = np.array([1.0, 0.0]), np.array([0.0, 2.0])
    f = torch.tensor([[[[a[0], b[0]]], [[a[1], b[1]]]]], dtype=torch.float32)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.1])
    assert dense_votes(f, w, bias, "none").tolist() == [[0, 1]]
    # bilinear x2 (align_corners=False) of [a, b] along the width: a, 3a/4+b/4, a/4+3b/4, b;
    # the height 1 -> 2 repeats the row
    cols = [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b]
    by_hand = [int(np.argmax(w.numpy() @ c + bias.numpy())) for c in cols] * 2
    votes = dense_votes(f, w, bias, "bilinear")
    assert votes.tolist() == [by_hand] == [[0, 0, 1, 1, 0, 0, 1, 1]]
    assert vote_counts(votes, 3).tolist() == [[4, 4, 0]]


def test_loss_golden_value() -> None:
    z = np.array([[1.0, -0.5, 2.0, 0.3, 0.0], [0.2, 0.1, -1.0, 1.5, 0.7]])
    y = np.array([2, 4])
    counts = np.array([[3, 1, 3, 0, 0], [0, 5, 1, 1, 2]], dtype=np.float64)
    lam = 0.1
    loss, terms = zfls_loss(
        torch.tensor(z, dtype=torch.float32),
        torch.tensor(y),
        torch.tensor(counts, dtype=torch.float32),
        lam=lam,
    )
    assert loss.item() == pytest.approx(_np_zipf_loss(z, y, counts, lam), rel=1e-5)
    ce = -np.mean(_np_log_softmax(z)[[0, 1], y])
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["zipf"].item() == pytest.approx((loss.item() - ce) / lam, rel=1e-4)


def test_no_gradient_through_pi_and_none_on_the_target_logit() -> None:
    z = torch.randn(3, 6, requires_grad=True)
    y = torch.tensor([0, 3, 5])
    pi = zipf_targets(torch.randint(0, 5, (3, 6)).float(), y).requires_grad_(True)
    zipf_kl(z, y, pi).backward()
    assert pi.grad is None
    assert torch.isfinite(z.grad).all()
    assert z.grad[torch.arange(3), y].abs().max() == 0  # the softmax excludes the target
    assert z.grad.abs().sum() > 0
    # counts come from votes: no graph at all
    f = torch.randn(2, 4, 2, 2, requires_grad=True)
    fc = nn.Linear(4, 6)
    counts = vote_counts(dense_votes(f, fc.weight, fc.bias), 6)
    assert counts.grad_fn is None and not counts.requires_grad
    assert counts.sum(1).tolist() == [16.0, 16.0]


# --- method ---------------------------------------------------------------------------------
class _Net(nn.Module):
    taps: ClassVar[dict[str, str]] = {"features": "body"}

    def __init__(self, k: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.classifier = nn.Linear(4, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x).mean((2, 3)))


def _ctx(k: int = 5) -> MethodContext:
    return MethodContext(
        num_classes=k,
        num_train=8,
        train_labels=torch.zeros(8, dtype=torch.long),
        epochs=1,
        steps_per_epoch=1,
        device=torch.device("cpu"),
        build_model=_Net,
        load_model=lambda path: _Net(),
    )


def test_step_matches_an_independent_computation() -> None:
    torch.manual_seed(0)
    model = _Net()
    method = build_method({"name": "zfls", "lam": 0.5, "upsample": "none"})
    method.setup(model, _ctx())
    x = torch.randn(3, 1, 3, 3)
    y = torch.tensor([0, 4, 2])
    out = method.training_step(
        model, Batch(inputs=x, targets=y, indices=torch.arange(3), raw=x, augment=lambda r: r), INFO
    )
    with torch.no_grad():
        feat = model.body(x).numpy().astype(np.float64)  # B, C, h, w
        w = model.classifier.weight.numpy().astype(np.float64)
        bias = model.classifier.bias.numpy().astype(np.float64)
        z = out.logits.numpy().astype(np.float64)
    dense = np.einsum("bchw,kc->bhwk", feat, w) + bias
    votes = dense.argmax(-1).reshape(3, -1)
    counts = np.stack([np.bincount(v, minlength=5) for v in votes]).astype(np.float64)
    assert out.loss.item() == pytest.approx(_np_zipf_loss(z, y.numpy(), counts, 0.5), rel=1e-5)
    assert set(out.terms) == {"ce", "zipf", "loss"}
    out.loss.backward()  # the graph is intact (votes are detached)
    assert model.classifier.weight.grad is not None


def test_model_without_tap_or_classifier_is_refused() -> None:
    class NoClassifier(nn.Module):
        taps: ClassVar[dict[str, str]] = {"features": "body"}

        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4, 5)

    class NoTap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(1, 4, 3)
            self.classifier = nn.Linear(4, 5)

    method = build_method({"name": "zfls"})
    with pytest.raises(ModelError, match=r"zfls.*classifier.*NoClassifier"):
        method.setup(NoClassifier(), _ctx())
    with pytest.raises(ModelError, match=r"zfls.*'features'.*NoTap"):
        method.setup(NoTap(), _ctx())
    # a module path works for a user's model
    build_method({"name": "zfls", "tap": "body"}).setup(NoTap(), _ctx())


def test_params_are_validated() -> None:
    with pytest.raises(ConfigError, match="upsample"):
        build_method({"name": "zfls", "upsample": "nearest"})
    with pytest.raises(ConfigError, match="lam"):
        build_method({"name": "zfls", "lam": -0.1})
    with pytest.raises(ConfigError, match="power"):
        build_method({"name": "zfls", "power": 0})


# --- end to end -----------------------------------------------------------------------------
def test_end_to_end_and_exact_resume(tiny_dict) -> None:
    tiny_dict["method"] = {"name": "zfls"}
    tiny_dict["train"]["epochs"] = 2
    rows = assert_resume_is_exact(tiny_dict)
    assert len(rows) == 2
    for term in ("train_ce", "train_zipf", "train_loss"):
        assert term in rows[0] and math.isfinite(rows[0][term])


def test_shipped_config_loads() -> None:
    cfg = load_config(Path(__file__).parents[1] / "configs" / "methods" / "zfls.yaml")
    assert cfg.method["name"] == "zfls"
    assert build_method(cfg.method).params.upsample == "bilinear"
