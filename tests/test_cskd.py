"""CS-KD: class-pair sampler, loss golden values, gradient flow, end-to-end run and resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import selfkd.methods.cskd  # noqa: F401  (registers the method)
from helpers import assert_resume_is_exact, np_log_softmax
from selfkd.config import load_config
from selfkd.data.samplers import ClassPairSampler
from selfkd.errors import ConfigError, TrainingError
from selfkd.losses.cskd import cskd_loss
from selfkd.methods.base import Batch, StepInfo, build_method

LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 0, 1, 3, 3, 1, 0, 2])
INFO = StepInfo(epoch=0, step=0, global_step=0, epochs=1, steps_per_epoch=1)


# --- sampler --------------------------------------------------------------------------------
def test_partners_share_the_anchor_class_and_anchors_cover_the_epoch() -> None:
    sampler = ClassPairSampler(LABELS, batch_size=5, seed=3)
    batches = sampler(0)
    assert len(batches) == len(sampler) == math.ceil(len(LABELS) / 5)
    anchors = []
    for b in batches:
        assert b.dtype == torch.long and b.numel() % 2 == 0
        half = b.numel() // 2
        a, p = b[:half], b[half:]
        assert torch.equal(LABELS[a], LABELS[p])
        anchors.append(a)
    assert [b.numel() for b in batches] == [10, 10, 10, 4]  # short last batch kept (official)
    assert sorted(torch.cat(anchors).tolist()) == list(range(len(LABELS)))


def test_sampler_is_a_pure_function_of_seed_and_epoch() -> None:
    a = ClassPairSampler(LABELS, 4, seed=7)
    b = ClassPairSampler(LABELS, 4, seed=7)
    for epoch in (0, 1, 5):
        assert all(torch.equal(x, y) for x, y in zip(a(epoch), b(epoch), strict=True))
        # calling again (or in another order) gives the same batches
        assert all(torch.equal(x, y) for x, y in zip(a(epoch), a(epoch), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a(0), a(1), strict=True))
    c = ClassPairSampler(LABELS, 4, seed=8)
    assert not all(torch.equal(x, y) for x, y in zip(a(0), c(0), strict=True))


def test_partner_is_uniform_over_the_class_including_the_anchor() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    sampler = ClassPairSampler(labels, batch_size=7, seed=0)
    hits = torch.zeros(7, 7)
    epochs = 600
    for epoch in range(epochs):
        (b,) = sampler(epoch)
        hits[b[:7], b[7:]] += 1
    class0 = hits[:3, :3] / epochs  # each of the 3 members (anchor itself included) ~ 1/3
    class1 = hits[3:, 3:] / epochs  # ~ 1/4
    assert hits[:3, 3:].sum() == 0 and hits[3:, :3].sum() == 0
    assert torch.allclose(class0, torch.full_like(class0, 1 / 3), atol=0.08)
    assert torch.allclose(class1, torch.full_like(class1, 1 / 4), atol=0.08)


def test_single_sample_class_is_refused_with_its_name() -> None:
    with pytest.raises(ConfigError, match=r"cskd.*class 4 has only 1"):
        ClassPairSampler(torch.tensor([0, 0, 1, 1, 4]), 2, seed=0)
    # a class with no sample at all is fine
    ClassPairSampler(torch.tensor([0, 0, 2, 2]), 2, seed=0)


def test_world_size_deals_batches_round_robin() -> None:
    full = ClassPairSampler(LABELS, 3, seed=1)(2)  # 6 batches
    r0 = ClassPairSampler(LABELS, 3, seed=1, rank=0, world_size=4)(2)
    r3 = ClassPairSampler(LABELS, 3, seed=1, rank=3, world_size=4)(2)
    assert len(r0) == len(r3) == 2
    assert torch.equal(r0[0], full[0]) and torch.equal(r0[1], full[4])
    assert torch.equal(r3[0], full[3]) and torch.equal(r3[1], full[1])  # padded with batch 1


# --- loss -----------------------------------------------------------------------------------
def test_loss_golden_values() -> None:
    za = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.2, -1.0]])
    zp = torch.tensor([[0.5, 0.0, 1.5], [2.0, -1.0, 0.0]])
    y = torch.tensor([2, 0])
    tau, lam = 4.0, 3.0
    a, p = za.numpy().astype(np.float64), zp.numpy().astype(np.float64)
    ce = -np.mean(np_log_softmax(a)[[0, 1], [2, 0]])
    lp, la = np_log_softmax(p / tau), np_log_softmax(a / tau)
    kl = np.mean(np.sum(np.exp(lp) * (lp - la), axis=1)) * tau**2
    loss, terms = cskd_loss(za, zp, y, tau=tau, lam=lam)
    assert loss.item() == pytest.approx(ce + lam * kl, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["cls_kd"].item() == pytest.approx(kl, rel=1e-5)
    # hand value of the KL for a 2-class row: p=(1/2,1/2), q=softmax((0, 4)/4)
    q = np.exp([0, 1]) / np.exp([0, 1]).sum()
    _, t = cskd_loss(torch.tensor([[0.0, 4.0]]), torch.zeros(1, 2), torch.tensor([1]), tau=4.0)
    assert t["cls_kd"].item() == pytest.approx(16 * (0.5 * np.log(0.5 / q).sum()), rel=1e-5)


def test_pair_side_gets_no_gradient() -> None:
    za = torch.randn(4, 5, requires_grad=True)
    zp = torch.randn(4, 5, requires_grad=True)
    loss, _ = cskd_loss(za, zp, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert za.grad is not None and za.grad.abs().sum() > 0
    assert zp.grad is None


class _Spy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.calls: list[tuple[int, bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], torch.is_grad_enabled(), self.training))
        return self.fc(x)


def test_step_forwards_anchors_with_grad_and_pairs_without() -> None:
    method = build_method({"name": "cskd"})
    model = _Spy().train()
    x = torch.randn(6, 3)
    y = torch.tensor([0, 1, 3, 0, 1, 3])
    batch = Batch(inputs=x, targets=y, indices=torch.arange(6), raw=x, augment=lambda r: r)
    out = method.training_step(model, batch, INFO)
    assert model.calls == [(3, True, True), (3, False, True)]
    assert torch.equal(out.targets, y[:3]) and out.logits.shape == (3, 4)
    with torch.no_grad():
        expected, _ = cskd_loss(model.fc(x[:3]), model.fc(x[3:]), y[:3])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(out.terms) == {"ce", "cls_kd", "loss"}
    bad = Batch(inputs=x[:5], targets=y[:5], indices=torch.arange(5), raw=x, augment=lambda r: r)
    with pytest.raises(TrainingError, match="class-pair sampler"):
        method.training_step(model, bad, INFO)
    mixed = Batch(
        inputs=x,
        targets=torch.tensor([0, 1, 3, 1, 0, 3]),
        indices=torch.arange(6),
        raw=x,
        augment=lambda r: r,
    )
    with pytest.raises(TrainingError, match="class-pair sampler"):
        method.training_step(model, mixed, INFO)


def test_params_are_validated() -> None:
    with pytest.raises(ConfigError, match="tau"):
        build_method({"name": "cskd", "tau": 0})
    with pytest.raises(ConfigError, match="lam"):
        build_method({"name": "cskd", "lam": -1})


# --- end to end -----------------------------------------------------------------------------
def test_end_to_end_and_exact_resume(tiny_dict) -> None:
    tiny_dict["method"] = {"name": "cskd"}
    tiny_dict["train"]["epochs"] = 2
    rows = assert_resume_is_exact(tiny_dict)
    assert len(rows) == 2
    for term in ("train_ce", "train_cls_kd", "train_loss"):
        assert term in rows[0] and math.isfinite(rows[0][term])


def test_shipped_config_loads() -> None:
    cfg = load_config(Path(__file__).parents[1] / "configs" / "methods" / "cskd.yaml")
    assert cfg.method["name"] == "cskd"
    assert build_method(cfg.method).params.tau == 4.0
