"""TF-KD (self and virtual teacher): losses pinned to the official normalization in numpy, the
near-uniform virtual teacher, the frozen teacher, and end-to-end runs with resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import selfkd.methods.tfkd  # noqa: F401  (registers the methods)
from helpers import (
    IDX,
    LABELS,
    K,
    assert_resume_is_exact,
    batch,
    np_log_softmax,
    np_logits,
    phase1_loader,
    tiny,
    toy_ctx,
)
from selfkd.config import config_from_dict, load_config
from selfkd.errors import ConfigError, ModelError
from selfkd.losses.smoothing import tfkd_kd_weight, tfkd_reg_loss, tfkd_self_loss, virtual_teacher
from selfkd.methods.base import (
    METHODS,
    MethodContext,
    StepInfo,
    build_method,
    method_defaults,
    parse_params,
)
from selfkd.methods.tfkd import TFKDReg, TFKDSelf

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "methods"
Z = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0], [-1.0, 1.5, 0.0, 0.3]])
ZT = torch.tensor([[1.0, 0.0, 2.5, -0.5], [0.3, -0.2, 1.0, 0.0], [0.0, 2.0, -1.0, 1.0]])
Y = torch.tensor([0, 2, 3])


def np_ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np_log_softmax(z)[np.arange(len(y)), y].mean())


def official_self(z, zt, y, alpha, T, m) -> float:
    """loss_kd_self as in the official code: KLDivLoss() 'mean' = sum / (B·K)."""
    log_q = np_log_softmax(zt / T)
    kl_mean = (np.exp(log_q) * (log_q - np_log_softmax(z / T))).mean()
    return (1 - alpha) * np_ce(z, y) + alpha * T * T * m * kl_mean


def official_reg(z, y, alpha, T, m, a=0.99) -> float:
    """loss_kd_regularization as in the official code (u fed to softmax as logits)."""
    k = z.shape[1]
    u = np.full(z.shape, (1 - a) / (k - 1))
    u[np.arange(len(y)), y] = a
    log_q = np_log_softmax(u / T)
    kl_mean = (np.exp(log_q) * (log_q - np_log_softmax(z))).mean()
    return (1 - alpha) * np_ce(z, y) + alpha * m * kl_mean


# --- the functional losses --------------------------------------------------------------------
def test_kd_weight_conversion() -> None:
    assert tfkd_kd_weight(0.95, 50, 100) == pytest.approx(0.475)
    assert tfkd_kd_weight(0.95, 50, 100) * 36 == pytest.approx(17.1)  # notes: effective 17.1
    assert tfkd_kd_weight(0.1, 100, 100) == pytest.approx(0.1)


def test_self_loss_matches_official_normalization() -> None:
    alpha, T, m = 0.95, 6.0, 50.0
    w = tfkd_kd_weight(alpha, m, 4)
    loss, terms = tfkd_self_loss(Z, Y, ZT, alpha=alpha, temperature=T, kd_weight=w)
    z, zt, y = Z.double().numpy(), ZT.double().numpy(), Y.numpy()
    assert loss.item() == pytest.approx(official_self(z, zt, y, alpha, T, m), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(np_ce(z, y), rel=1e-6)
    log_q = np_log_softmax(zt / T)
    kd = T * T * (np.exp(log_q) * (log_q - np_log_softmax(z / T))).sum(1).mean()
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-5)
    # kd_weight 0: CE only, no kd term
    loss0, terms0 = tfkd_self_loss(Z, Y, ZT, alpha=0.3, temperature=T, kd_weight=0.0)
    assert loss0.item() == pytest.approx(0.7 * np_ce(z, y), rel=1e-6) and "kd" not in terms0


def test_self_loss_teacher_gets_no_gradient() -> None:
    z = Z.clone().requires_grad_(True)
    zt = ZT.clone().requires_grad_(True)
    loss, _ = tfkd_self_loss(z, Y, zt, alpha=0.5, temperature=2.0, kd_weight=1.0)
    loss.backward()
    assert zt.grad is None
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_virtual_teacher_is_nearly_uniform() -> None:
    q = virtual_teacher(torch.tensor([3, 0]), 100, 0.99, 20.0)
    # notes §3: K = 100, T = 20 → q_y = 0.01050, q_other = 0.009995
    assert q[0, 3].item() == pytest.approx(0.01050, abs=5e-6)
    assert q[0, 0].item() == pytest.approx(0.009995, abs=5e-7)
    # independently: q_y = e^{a/T} / (e^{a/T} + 99·e^{u_o/T}), u_o = 0.01/99
    uo = 0.01 / 99
    den = math.exp(0.99 / 20) + 99 * math.exp(uo / 20)
    assert q[1, 0].item() == pytest.approx(math.exp(0.99 / 20) / den, rel=1e-6)
    assert q[1, 5].item() == pytest.approx(math.exp(uo / 20) / den, rel=1e-6)
    np.testing.assert_allclose(q.sum(1).numpy(), 1.0, rtol=1e-6)
    assert virtual_teacher(torch.tensor([0]), 100, 0.99, 40.0)[0, 0].item() == pytest.approx(
        0.01025, abs=5e-6
    )


def test_reg_loss_matches_official() -> None:
    z, y = Z.double().numpy(), Y.numpy()
    for alpha, T, m in ((0.1, 20.0, 100.0), (0.95, 10.0, 1.0)):
        w = tfkd_kd_weight(alpha, m, 4)
        loss, terms = tfkd_reg_loss(Z, Y, alpha=alpha, temperature=T, kd_weight=w)
        assert loss.item() == pytest.approx(official_reg(z, y, alpha, T, m), rel=1e-5)
        assert set(terms) == {"ce", "kd"}
    # K = 100, official ResNet-18 config: effectively 0.9·CE + 0.1·KL_bm
    z100 = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    y100 = torch.tensor([1, 50, 99, 0])
    loss, terms = tfkd_reg_loss(
        z100, y100, alpha=0.1, temperature=20.0, kd_weight=tfkd_kd_weight(0.1, 100, 100)
    )
    assert loss.item() == pytest.approx(0.9 * terms["ce"].item() + 0.1 * terms["kd"].item())
    assert loss.item() == pytest.approx(
        official_reg(z100.double().numpy(), y100.numpy(), 0.1, 20.0, 100.0), rel=1e-5
    )


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="alpha"):
        tfkd_reg_loss(Z, Y, alpha=1.5, temperature=2.0, kd_weight=0.1)
    with pytest.raises(ValueError, match="kd_weight"):
        tfkd_self_loss(Z, Y, ZT, alpha=0.5, temperature=2.0, kd_weight=-1.0)
    with pytest.raises(ValueError, match="2 classes"):
        virtual_teacher(torch.tensor([0]), 1)
    for cls, values in (
        (TFKDSelf, {"alpha": 1.1}),
        (TFKDSelf, {"temperature": 0.0}),
        (TFKDSelf, {"multiplier": -1.0}),
        (TFKDSelf, {"kd_weight": -0.5}),
        (TFKDSelf, {"teacher": ""}),
        (TFKDReg, {"correct_prob": 1.2}),
        (TFKDReg, {"temperature": -20.0}),
        (TFKDReg, {"teacher": "auto"}),
    ):
        with pytest.raises(ConfigError):
            parse_params(cls, values)


# --- the methods ------------------------------------------------------------------------------
def ctx(loaded: list, teacher_classes: int = K) -> MethodContext:
    return toy_ctx(phase1_loader(loaded, teacher_classes))


INFO = StepInfo(epoch=0, step=0, global_step=0, epochs=2, steps_per_epoch=2)


def test_registered_with_official_defaults() -> None:
    assert METHODS.get("tf-kd-self") is TFKDSelf and METHODS.get("tf-kd-reg") is TFKDReg
    assert method_defaults("tfkd_self") == {
        "name": "tfkd_self",
        "alpha": 0.95,
        "temperature": 6.0,
        "multiplier": 50.0,
        "kd_weight": None,
        "teacher": "auto",
    }
    assert method_defaults("tfkd_reg") == {
        "name": "tfkd_reg",
        "alpha": 0.1,
        "temperature": 20.0,
        "multiplier": 100.0,
        "kd_weight": None,
        "correct_prob": 0.99,
    }
    assert TFKDSelf.teacher_param == "teacher" and TFKDReg.teacher_param is None


def test_self_step_with_frozen_teacher() -> None:
    loaded: list = []
    method = TFKDSelf(parse_params(TFKDSelf, {"teacher": "phase1.pt"}))
    student = tiny(0)
    method.setup(student, ctx(loaded))
    method.train()
    teacher = loaded[0]
    assert method.teacher is teacher and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert set(method.state_dict()) <= {"_extra_state"} and not list(method.parameters())
    assert method.kd_weight == pytest.approx(0.95 * 50 / K)
    before = [p.clone() for p in teacher.parameters()]

    out = method.training_step(student, batch(IDX), INFO)
    out.loss.backward()
    s, t, y = np_logits(student, IDX), np_logits(teacher, IDX), LABELS[IDX].numpy()
    assert out.loss.item() == pytest.approx(official_self(s, t, y, 0.95, 6.0, 50.0), rel=1e-5)
    assert set(out.terms) == {"ce", "kd"}
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    assert student[1].weight.grad is not None


def test_self_kd_weight_override_and_off() -> None:
    loaded: list = []
    method = TFKDSelf(parse_params(TFKDSelf, {"teacher": "phase1.pt", "kd_weight": 0.25}))
    method.setup(tiny(0), ctx(loaded))
    assert method.kd_weight == 0.25
    # KD off: no teacher needed, none loaded, loss = (1−α)·CE
    off = TFKDSelf(parse_params(TFKDSelf, {"kd_weight": 0.0, "alpha": 0.0}))
    assert not off.needs_teacher()
    loaded.clear()
    student = tiny(0)
    off.setup(student, ctx(loaded))
    assert loaded == [] and off.teacher is None
    out = off.training_step(student, batch(IDX), INFO)
    ce = np_ce(np_logits(student, IDX), LABELS[IDX].numpy())
    assert out.loss.item() == pytest.approx(ce, rel=1e-6) and set(out.terms) == {"ce"}


def test_self_errors() -> None:
    with pytest.raises(ConfigError, match="tfkd_self"):
        TFKDSelf().setup(tiny(0), ctx([]))  # 'auto' not resolved by the engine
    method = TFKDSelf(parse_params(TFKDSelf, {"teacher": "phase1.pt"}))
    method.setup(tiny(0), ctx([], teacher_classes=K + 1))
    with pytest.raises(ModelError, match="teacher"):
        method.training_step(tiny(0), batch(IDX), INFO)


def test_reg_step() -> None:
    method = TFKDReg()
    student = tiny(0)
    method.setup(student, ctx([]))
    assert method.kd_weight == pytest.approx(0.1 * 100 / K)
    out = method.training_step(student, batch(IDX), INFO)
    s, y = np_logits(student, IDX), LABELS[IDX].numpy()
    assert out.loss.item() == pytest.approx(official_reg(s, y, 0.1, 20.0, 100.0), rel=1e-5)
    assert out.terms["ce"].item() == pytest.approx(np_ce(s, y), rel=1e-6)
    one = TFKDReg()
    with pytest.raises(ConfigError, match="tfkd_reg"):
        one.setup(
            student,
            MethodContext(1, 2, torch.zeros(2), 1, 1, torch.device("cpu"), tiny, tiny),
        )


@pytest.mark.parametrize("name", ["tfkd_self", "tfkd_reg"])
def test_shipped_configs_build(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert build_method(cfg.method).name == name
    assert cfg.method == method_defaults(name)


@pytest.mark.parametrize("name", ["tfkd_self", "tfkd_reg"])
def test_end_to_end_and_resume(tiny_dict, name: str) -> None:
    from selfkd.engine.runner import phase1_config

    tiny_dict["method"] = {"name": name}
    tiny_dict["train"]["epochs"] = 2
    tiny_dict["run"]["name"] = "full"
    full = assert_resume_is_exact(tiny_dict)
    assert len(full) == 2 and "train_ce" in full[0] and "train_kd" in full[0]
    phase1 = phase1_config(config_from_dict(tiny_dict))
    assert (Path(phase1.run.out_dir) / phase1.run.name).exists() == (name == "tfkd_self")


def test_frozen_forward_is_eval_no_grad_and_checks_shapes() -> None:
    from selfkd.errors import ModelError
    from selfkd.methods.base import frozen_forward

    frozen = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).train()
    x = torch.randn(5, 3)
    out = frozen_forward(frozen, x, torch.zeros(5, 4), "teacher", "tfkd_self")
    assert not frozen.training and not out.requires_grad
    with pytest.raises(
        ModelError, match=r"tfkd_self: the teacher outputs \(5, 4\) but the student"
    ):
        frozen_forward(frozen, x, torch.zeros(5, 7), "teacher", "tfkd_self")
