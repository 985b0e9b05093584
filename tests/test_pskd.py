"""PS-KD: loss pinned to numpy, α_t schedule, epoch-0 one-hot targets, bank writes, state."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selfkd.methods.pskd  # noqa: F401  (registers the method)
from helpers import (
    IDX,
    LABELS,
    K,
    N,
    assert_resume_is_exact,
    batch,
    np_log_softmax,
    np_logits,
    tiny,
    toy_ctx,
)
from selfkd.config import load_config
from selfkd.errors import ConfigError
from selfkd.losses.pskd import pskd_alpha, pskd_loss, pskd_targets
from selfkd.methods.base import (
    METHODS,
    StepInfo,
    build_method,
    method_defaults,
    parse_params,
)
from selfkd.methods.pskd import PSKD

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "methods"

Z = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-1.0, 1.5, 0.0]])
Y = torch.tensor([0, 2, 1])
P = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])


def np_pskd(z: np.ndarray, y: np.ndarray, prev: np.ndarray, alpha: float) -> float:
    onehot = np.eye(z.shape[1])[y]
    target = (1 - alpha) * onehot + alpha * prev
    return float(-(target * np_log_softmax(z)).sum(axis=1).mean())


# --- the functional loss ----------------------------------------------------------------------
def test_alpha_schedule() -> None:
    assert pskd_alpha(0, 300) == pytest.approx(0.8 / 300)
    assert pskd_alpha(149, 300) == pytest.approx(0.4)
    assert pskd_alpha(299, 300) == pytest.approx(0.8)
    assert pskd_alpha(0, 2, 0.5) == pytest.approx(0.25)
    assert pskd_alpha(0, 4, -1.0) == 0.0  # clamped at 0 as in the official code
    with pytest.raises(ValueError):
        pskd_alpha(0, 0)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_loss_matches_numpy(alpha: float) -> None:
    got = pskd_loss(Z, Y, P, alpha).item()
    assert got == pytest.approx(np_pskd(Z.double().numpy(), Y.numpy(), P.double().numpy(), alpha))
    t = pskd_targets(Y, P, alpha)
    np.testing.assert_allclose(t.sum(1).numpy(), 1.0, rtol=1e-6)


def test_one_hot_prev_or_zero_alpha_is_ce() -> None:
    ce = F.cross_entropy(Z, Y).item()
    assert pskd_loss(Z, Y, F.one_hot(Y, 3).float(), 0.7).item() == pytest.approx(ce, rel=1e-6)
    assert pskd_loss(Z, Y, P, 0.0).item() == pytest.approx(ce, rel=1e-6)


def test_gradients_reach_logits_only() -> None:
    z = Z.clone().requires_grad_(True)
    prev = P.clone().requires_grad_(True)
    pskd_loss(z, Y, prev, 0.5).backward()
    assert prev.grad is None  # the previous predictions are a detached target
    p = np.exp(np_log_softmax(Z.double().numpy()))
    target = 0.5 * np.eye(3)[Y.numpy()] + 0.5 * P.double().numpy()
    np.testing.assert_allclose(z.grad.numpy(), (p - target) / 3, rtol=1e-5, atol=1e-7)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="alpha_t"):
        pskd_loss(Z, Y, P, 1.5)
    with pytest.raises(ValueError, match="shape"):
        pskd_loss(Z, Y, P[:2], 0.5)
    for values in ({"alpha_T": 1.5}, {"alpha_T": -0.1}, {"bank_dtype": "int8"}, {"alpha": 1}):
        with pytest.raises(ConfigError):
            parse_params(PSKD, values)


# --- the method -------------------------------------------------------------------------------
def make(params: dict | None = None, epochs: int = 4) -> tuple[PSKD, nn.Module]:
    ctx = toy_ctx(lambda path: tiny(98), epochs=epochs)
    method = PSKD(parse_params(PSKD, params or {}))
    model = tiny(0)
    method.setup(model, ctx)
    method.train()
    return method, model


def info(epoch: int, epochs: int = 4) -> StepInfo:
    return StepInfo(epoch=epoch, step=0, global_step=0, epochs=epochs, steps_per_epoch=2)


def test_registered_with_paper_defaults() -> None:
    assert METHODS.get("ps-kd") is PSKD
    assert method_defaults("pskd") == {
        "name": "pskd",
        "alpha_T": 0.8,
        "bank_dtype": "float16",
        "bank_topk": None,
    }
    assert PSKD.teacher_param is None and not PSKD().needs_teacher()


def test_epoch0_targets_are_one_hot_even_with_written_rows() -> None:
    method, model = make()
    assert method.bank is not None
    method.bank.update(IDX, torch.randn(4, K))  # rows already written: epoch 0 ignores them
    out = method.training_step(model, batch(IDX), info(0))
    ce = F.cross_entropy(torch.tensor(np_logits(model, IDX)), LABELS[IDX]).item()
    assert out.loss.item() == pytest.approx(ce, rel=1e-6)
    assert set(out.terms) == {"pskd", "alpha_t"}
    assert out.terms["alpha_t"].item() == pytest.approx(0.8 / 4)
    assert out.terms["pskd"].item() == pytest.approx(out.loss.item())


def test_bank_rows_replaced_after_step_with_pre_update_logits() -> None:
    method, model = make({"bank_dtype": "float32"})
    assert method.bank is not None
    before = method.bank.table.clone()
    pre_update = np_logits(model, IDX)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    b = batch(IDX)
    out = method.training_step(model, b, info(0))
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    assert not np.allclose(np_logits(model, IDX), pre_update)  # the weights did change
    method.after_optimizer_step(model, b, out)
    table = method.bank.table
    np.testing.assert_allclose(table[IDX].numpy(), np_log_softmax(pre_update), rtol=1e-5)
    rest = torch.tensor([i for i in range(N) if i not in IDX.tolist()])
    assert torch.equal(table[rest], before[rest])  # other rows still one-hot
    assert torch.equal(table[rest].exp(), F.one_hot(LABELS[rest], K).float())

    # epoch 2 uses the stored predictions: target = (1−α)·onehot + α·softmax(stored)
    out2 = method.training_step(model, batch(IDX), info(2))
    alpha = 0.8 * 3 / 4
    prev = np.exp(np_log_softmax(pre_update))
    want = np_pskd(np_logits(model, IDX), LABELS[IDX].numpy(), prev, alpha)
    assert out2.loss.item() == pytest.approx(want, rel=1e-5)
    assert out2.terms["alpha_t"].item() == pytest.approx(alpha)
    # the samples never written are one-hot rows: their target is the label, loss = CE
    out3 = method.training_step(model, batch(rest), info(3))
    ce = F.cross_entropy(torch.tensor(np_logits(model, rest)), LABELS[rest]).item()
    assert out3.loss.item() == pytest.approx(ce, rel=1e-5)


def test_fp16_bank_targets_sum_to_one() -> None:
    method, model = make()
    assert method.bank is not None and method.bank.dtype == torch.float16
    logits = 3 * torch.randn(4, K, generator=torch.Generator().manual_seed(3))
    method.bank.update(IDX, logits)
    out = method.training_step(model, batch(IDX), info(1))
    want = np_pskd(
        np_logits(model, IDX),
        LABELS[IDX].numpy(),
        np.exp(np_log_softmax(logits.double().numpy())),
        0.4,
    )
    assert out.loss.item() == pytest.approx(want, rel=2e-3)


def test_state_restore() -> None:
    method, _ = make()
    assert method.bank is not None
    method.bank.update(IDX, torch.randn(4, K))
    state = method.state_dict()
    assert set(state) >= {"bank.table"}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh, _ = make()
    assert fresh.bank is not None
    assert not torch.equal(fresh.bank.table, method.bank.table)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.bank.table, method.bank.table)
    assert fresh.bank.table.dtype == torch.float16


def test_shipped_config_builds() -> None:
    cfg = load_config(CONFIGS / "pskd.yaml")
    assert isinstance(build_method(cfg.method), PSKD)
    assert cfg.method == method_defaults("pskd")


def test_end_to_end_and_resume(tiny_dict) -> None:
    tiny_dict["method"] = {"name": "pskd"}
    tiny_dict["train"]["epochs"] = 2
    full = assert_resume_is_exact(tiny_dict)  # the bank comes back with the checkpoint
    assert [r["train_alpha_t"] for r in full] == pytest.approx([0.4, 0.8])
    assert all("train_pskd" in r for r in full)
