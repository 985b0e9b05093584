"""BYOT: loss against hand-computed values, gradient flow, exit heads, engine run and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import selfkd.methods.byot  # noqa: F401  (registers byot)
from helpers import assert_resume_is_exact, read_final
from selfkd.errors import ConfigError, ModelError
from selfkd.losses.byot import byot_loss, feature_hint_loss
from selfkd.methods.base import Batch, MethodContext, StepInfo
from selfkd.methods.byot import BYOT, BYOTParams
from selfkd.methods.heads import BottleneckExit
from selfkd.models import build_model


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    return np.log(np_softmax(z))


DEEP = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
EXITS = [
    np.array([[1.0, 0.5, 0.0], [0.0, 0.0, 1.0]]),
    np.array([[0.2, -0.4, 0.9], [1.0, 2.0, 3.0]]),
]
F_DEEP = np.array([[1.0, 2.0], [0.0, -1.0]])
F_EXITS = [np.array([[0.0, 2.0], [1.0, 1.0]]), np.array([[1.5, 1.0], [-1.0, -1.0]])]
Y = np.array([0, 2])


def t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32, requires_grad=grad)


def test_byot_loss_golden():
    alpha, temp, lam = 0.3, 3.0, 0.03

    def ce(z):
        return -np.mean(np_log_softmax(z)[np.arange(2), Y])

    def kd(z):
        p = np_softmax(DEEP / temp)
        return temp**2 * np.mean(np.sum(p * (np.log(p) - np_log_softmax(z / temp)), axis=1))

    ce_deep = ce(DEEP)
    ce_exits = sum(ce(z) for z in EXITS)
    kd_exits = sum(kd(z) for z in EXITS)
    # per sample squared L2, batch mean, summed over exits, written out element by element
    feature = 0.0
    for f in F_EXITS:
        feature += np.mean([sum((f[b, d] - F_DEEP[b, d]) ** 2 for d in range(2)) for b in range(2)])
    assert feature == pytest.approx((1 + 5) / 2 + (1.25 + 1) / 2)
    expected = (1 - alpha) * (ce_deep + ce_exits) + alpha * kd_exits + lam * feature
    loss, terms = byot_loss(
        t(DEEP),
        [t(z) for z in EXITS],
        torch.tensor(Y),
        t(F_DEEP),
        [t(f) for f in F_EXITS],
        alpha=alpha,
        temperature=temp,
        feature_weight=lam,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    for name, value in {
        "ce_deep": ce_deep,
        "ce_exits": ce_exits,
        "kd_exits": kd_exits,
        "feature": feature,
    }.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name
    # λ = 0: no feature term, features not needed
    loss0, terms0 = byot_loss(t(DEEP), [t(z) for z in EXITS], torch.tensor(Y), feature_weight=0.0)
    assert "feature" not in terms0
    assert loss0.item() == pytest.approx(expected - lam * feature, rel=1e-5)


def test_feature_hint_shapes_must_match():
    with pytest.raises(ValueError, match="feature shapes differ"):
        feature_hint_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_deep_teacher_detached():
    deep, f_deep = t(DEEP, grad=True), t(F_DEEP, grad=True)
    exits, f_exits = [t(z, grad=True) for z in EXITS], [t(f, grad=True) for f in F_EXITS]
    # α = 1: the CE terms carry weight 0, so only KD and feature terms remain
    loss, _ = byot_loss(deep, exits, torch.tensor(Y), f_deep, f_exits, alpha=1.0)
    loss.backward()
    assert deep.grad is not None and deep.grad.abs().sum() == 0
    assert f_deep.grad is None
    for z, f in zip(exits, f_exits, strict=True):
        assert z.grad.abs().sum() > 0 and f.grad.abs().sum() > 0
    # with CE weight the deepest classifier learns from its labels
    deep = t(DEEP, grad=True)
    byot_loss(deep, [t(z) for z in EXITS], torch.tensor(Y), feature_weight=0.0)[0].backward()
    assert deep.grad.abs().sum() > 0


# --- heads and the method -------------------------------------------------------------------


def ctx(num_classes: int, input_shape: tuple[int, int, int]) -> MethodContext:
    return MethodContext(
        num_classes=num_classes,
        num_train=8,
        train_labels=torch.arange(8) % num_classes,
        epochs=1,
        steps_per_epoch=1,
        device=torch.device("cpu"),
        build_model=lambda: None,
        load_model=lambda path: None,
        input_shape=input_shape,
    )


def test_exits_for_resnet8():
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=4, in_channels=1, width=4)
    method = BYOT()
    method.setup(model, ctx(4, (1, 12, 12)))
    assert method.exit_taps == ["stage1", "stage2"]
    assert [e.kernel for e in method.exits] == [(4, 4), (2, 2)]  # 12x12, 6x6 -> 3x3
    assert method.main_optimizer_modules() == [method.exits]
    assert any(k.startswith("exits.") for k in method.state_dict())
    x = torch.randn(5, 1, 12, 12)
    batch = Batch(
        inputs=x, targets=torch.arange(5) % 4, indices=torch.arange(5), raw=x, augment=lambda r: r
    )
    info = StepInfo(epoch=0, step=0, global_step=0, epochs=1, steps_per_epoch=1)
    out = method.training_step(model, batch, info)
    assert out.logits.shape == (5, 4)
    assert set(out.terms) == {"ce_deep", "ce_exits", "kd_exits", "feature", "loss"}
    out.loss.backward()
    for head in method.exits:
        assert head.fc.weight.grad.abs().sum() > 0
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_exits_for_preact_resnet18():
    model = build_model("preact_resnet18", num_classes=10)
    method = BYOT()
    method.setup(model, ctx(10, (3, 32, 32)))
    assert method.exit_taps == ["stage1", "stage2", "stage3"]
    assert [e.kernel for e in method.exits] == [(8, 8), (4, 4), (2, 2)]
    for head, (c, s) in zip(method.exits, [(64, 32), (128, 16), (256, 8)], strict=True):
        z, f = head(torch.zeros(2, c, s, s))
        assert z.shape == (2, 10) and f.shape == (2, 512)


def test_bottleneck_exit_direct():
    head = BottleneckExit(8, 16, 5, kernel=(2, 2))
    z, f = head(torch.randn(3, 8, 6, 6))
    assert z.shape == (3, 5) and f.shape == (3, 16)


def test_model_without_stage_taps():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(4))
    with pytest.raises(ModelError, match=r"method byot.*stage1"):
        BYOT().setup(model, ctx(4, (1, 12, 12)))


def test_bad_params():
    with pytest.raises(ConfigError, match="alpha"):
        BYOT(BYOTParams(alpha=1.5))
    with pytest.raises(ConfigError, match="temperature"):
        BYOT(BYOTParams(temperature=0.0))
    with pytest.raises(ConfigError, match="feature_weight"):
        BYOT(BYOTParams(feature_weight=-1.0))


# --- engine ---------------------------------------------------------------------------------


def test_byot_end_to_end_and_exact_resume(tiny_dict):
    tiny_dict["method"] = {"name": "byot"}
    tiny_dict["train"]["epochs"] = 2
    full = assert_resume_is_exact(tiny_dict)
    assert read_final(Path(tiny_dict["run"]["out_dir"]) / "full")["method"] == "byot"
    assert len(full) == 2
    for term in ("ce_deep", "ce_exits", "kd_exits", "feature", "loss"):
        assert f"train_{term}" in full[0], term
