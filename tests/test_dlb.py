"""DLB: the second half is the previous batch, golden losses, gradient flow, resume."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import selfkd.methods.dlb  # noqa: F401  (registers the method)
from helpers import assert_resume_is_exact, np_log_softmax
from selfkd.config import load_config
from selfkd.errors import ConfigError
from selfkd.losses.dlb import dlb_loss
from selfkd.methods.base import Batch, MethodContext, StepInfo, build_method


def _info(step: int) -> StepInfo:
    return StepInfo(epoch=0, step=step, global_step=step, epochs=1, steps_per_epoch=9)


# --- loss -----------------------------------------------------------------------------------
def test_loss_golden_values() -> None:
    z = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    zp = np.array([[0.2, 0.1, 0.9], [1.5, -0.5, 0.0], [0.0, 0.0, 3.0]])
    zs = np.array([[0.0, 1.0, 2.0], [2.0, 0.0, -2.0], [1.0, 1.0, 1.0]])
    y, yp = np.array([0, 1]), np.array([2, 0, 2])
    tau, alpha = 3.0, 0.7
    allz = np.concatenate([z, zp])
    ally = np.concatenate([y, yp])
    ce = -np.mean(np_log_softmax(allz)[np.arange(5), ally])
    ls, lq = np_log_softmax(zs / tau), np_log_softmax(zp / tau)
    kl = tau**2 * np.mean(np.sum(np.exp(ls) * (ls - lq), axis=1))
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    loss, terms = dlb_loss(
        t(z), torch.tensor(y), t(zp), torch.tensor(yp), t(zs), tau=tau, alpha=alpha
    )
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["dlb_kd"].item() == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(ce + alpha * kl, rel=1e-5)
    # first step: CE on the current batch only
    loss0, terms0 = dlb_loss(t(z), torch.tensor(y))
    assert loss0.item() == pytest.approx(-np.mean(np_log_softmax(z)[[0, 1], y]), rel=1e-5)
    assert terms0["dlb_kd"].item() == 0.0
    with pytest.raises(ValueError, match="together"):
        dlb_loss(t(z), torch.tensor(y), t(zp))


def test_saved_logits_get_no_gradient() -> None:
    z = torch.randn(2, 4, requires_grad=True)
    zp = torch.randn(3, 4, requires_grad=True)
    zs = torch.randn(3, 4, requires_grad=True)
    loss, _ = dlb_loss(z, torch.tensor([0, 1]), zp, torch.tensor([1, 2, 3]), zs)
    loss.backward()
    assert z.grad is not None and zp.grad is not None and zp.grad.abs().sum() > 0
    assert zs.grad is None


# --- method steps ---------------------------------------------------------------------------
class _Spy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.fc(x.flatten(1))


def _augment(raw: torch.Tensor) -> torch.Tensor:
    return raw.float() / 255 + 0.5  # deterministic, distinguishable from view 0


def _batch(seed: int, n: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, 1, 2, 2), generator=g, dtype=torch.uint8)
    targets = torch.randint(0, 3, (n,), generator=g)
    return Batch(
        inputs=raw.float() / 255,
        targets=targets,
        indices=torch.arange(n),
        raw=raw,
        augment=_augment,
    )


def test_second_half_is_the_previous_batch() -> None:
    method = build_method({"name": "dlb", "tau": 3.0, "alpha": 1.0})
    model = _Spy()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    b1, b2, b3 = _batch(1, 4), _batch(2, 4), _batch(3, 3)

    out1 = method.training_step(model, b1, _info(0))
    assert len(model.inputs) == 1 and model.inputs[0].shape[0] == 4  # first step: batch t only
    assert out1.loss.item() == pytest.approx(
        nn.functional.cross_entropy(out1.logits, b1.targets).item()
    )
    assert out1.terms["dlb_kd"].item() == 0.0
    opt.zero_grad()
    out1.loss.backward()
    opt.step()
    method.after_optimizer_step(model, b1, out1)
    assert torch.equal(method.prev["targets"], b1.targets)
    assert torch.equal(method.prev["logits"], out1.logits.detach())
    assert torch.equal(method.prev["raw"], b1.raw)

    prev_out = out1
    for prev_batch, batch, step in ((b1, b2, 1), (b2, b3, 2)):
        saved = method.prev["logits"].clone()
        out = method.training_step(model, batch, _info(step))
        x = model.inputs[-1]
        n = batch.inputs.shape[0]
        # ONE forward of [view 0 of batch t; new view of batch t-1]
        assert x.shape[0] == n + prev_batch.inputs.shape[0]
        assert torch.equal(x[:n], batch.inputs)
        assert torch.equal(x[n:], _augment(prev_batch.raw))
        # the saved teacher logits are the previous step's view-0 logits
        assert torch.equal(saved, prev_out.logits.detach())
        assert torch.equal(out.targets, batch.targets) and out.logits.shape == (n, 3)
        with torch.no_grad():
            z_all = model.fc(x.flatten(1))
        expected, _ = dlb_loss(
            z_all[:n], batch.targets, z_all[n:], prev_batch.targets, saved, tau=3.0, alpha=1.0
        )
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert out.terms["dlb_kd"].item() > 0
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_optimizer_step(model, batch, out)
        # the second half's targets at the next step are this step's targets
        assert torch.equal(method.prev["targets"], batch.targets)
        prev_out = out


def test_extra_state_round_trip_is_weights_only_loadable() -> None:
    method = build_method({"name": "dlb"})
    model = _Spy()
    b = _batch(5, 4)
    out = method.training_step(model, b, _info(0))
    method.after_optimizer_step(model, b, out)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = build_method({"name": "dlb"})
    assert fresh.prev is None
    fresh.load_state_dict(state)
    for key in ("raw", "targets", "logits"):
        assert torch.equal(fresh.prev[key], method.prev[key])
    assert fresh.prev["raw"].dtype == torch.uint8
    # an empty state (before the first step) round-trips to "no previous batch"
    empty = build_method({"name": "dlb"})
    fresh.load_state_dict(empty.state_dict())
    assert fresh.prev is None


def test_batch_size_one_and_bad_params_are_refused() -> None:
    ctx = MethodContext(
        num_classes=3,
        num_train=10,
        train_labels=torch.zeros(10, dtype=torch.long),
        epochs=1,
        steps_per_epoch=10,
        device=torch.device("cpu"),
        build_model=lambda: nn.Linear(1, 1),
        load_model=lambda path: nn.Linear(1, 1),
        config={"data": {"batch_size": 1}},
    )
    with pytest.raises(ConfigError, match=r"dlb.*batch_size"):
        build_method({"name": "dlb"}).setup(_Spy(), ctx)
    with pytest.raises(ConfigError, match="tau"):
        build_method({"name": "dlb", "tau": -1})
    with pytest.raises(ConfigError, match="alpha"):
        build_method({"name": "dlb", "alpha": float("nan")})


# --- end to end -----------------------------------------------------------------------------
def test_end_to_end_and_exact_resume(tiny_dict) -> None:
    tiny_dict["method"] = {"name": "dlb"}
    tiny_dict["train"]["epochs"] = 2
    tiny_dict["data"]["options"]["train_per_class"] = 10  # 40 samples: a short last batch
    rows = assert_resume_is_exact(tiny_dict)
    assert len(rows) == 2
    for term in ("train_ce", "train_dlb_kd", "train_loss"):
        assert term in rows[0] and math.isfinite(rows[0][term])
    assert rows[1]["train_dlb_kd"] > 0


def test_shipped_config_loads() -> None:
    cfg = load_config(Path(__file__).parents[1] / "configs" / "methods" / "dlb.yaml")
    assert cfg.method["name"] == "dlb"
    assert build_method(cfg.method).params.tau == 3.0
