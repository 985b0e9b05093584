"""DRG, DSR and DRG+DSR: losses against hand-computed values, gradient flow, heads, engine runs."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import selfkd.methods.drg  # noqa: F401  (registers drg, dsr, drg_dsr)
from helpers import assert_resume_is_exact, metric_rows
from selfkd.config import config_from_dict
from selfkd.engine import train
from selfkd.errors import ConfigError, ModelError
from selfkd.losses.drg import drg_dsr_loss, reverse_guidance_loss, shape_regularization_loss
from selfkd.methods.base import Batch, MethodContext, StepInfo, build_method
from selfkd.methods.drg import DRG, DRGDSR, DSR, DRGDSRParams, DRGParams, DSRParams
from selfkd.methods.heads import AuxiliaryClassifier
from selfkd.models import FeatureTaps, build_model

# --- independent references (numpy) ---------------------------------------------------------


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_tempered_kl(teacher: np.ndarray, student: np.ndarray, tau: float) -> float:
    p = np_softmax(teacher / tau)
    q = np_softmax(student / tau)
    return float(tau**2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def np_ce(z: np.ndarray, y: np.ndarray) -> float:
    p = np_softmax(z)
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


MAIN = np.array([[2.0, -1.0, 0.5, 0.0], [0.1, 0.3, -2.0, 1.5], [-0.5, 0.0, 0.2, 3.0]])
AC = np.array([[1.0, 0.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5], [0.3, -0.3, 1.2, 0.4]])
PREV = np.array([[3.0, -2.0, 1.0, 0.0], [0.5, 0.4, 0.3, -1.0]])  # unsorted, 2 rows
Y = np.array([0, 3, 2])


def t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32, requires_grad=grad)


# --- losses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_reverse_guidance_golden(tau):
    expected = np_tempered_kl(AC, MAIN, tau)  # the AC is the teacher
    got = reverse_guidance_loss(t(MAIN), t(AC), tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() != pytest.approx(np_tempered_kl(MAIN, AC, tau), rel=1e-3)


def test_shape_regularization_golden_sorts_pairs_and_trims():
    tau = 4.0
    # by hand: 3 current rows vs 2 previous rows -> first 2 rows of each, each row sorted
    cur_sorted = np.array([[-1.0, 0.0, 0.5, 2.0], [-2.0, 0.1, 0.3, 1.5]])
    prev_sorted = np.array([[-2.0, 0.0, 1.0, 3.0], [-1.0, 0.3, 0.4, 0.5]])
    expected = np_tempered_kl(prev_sorted, cur_sorted, tau)
    got = shape_regularization_loss(t(MAIN), t(PREV), tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the previous batch larger than the current one: trimmed the other way
    got2 = shape_regularization_loss(t(PREV[:1]), t(MAIN), tau)
    expected2 = np_tempered_kl(np.sort(MAIN[:1], axis=1), np.sort(PREV[:1], axis=1), tau)
    assert got2.item() == pytest.approx(expected2, rel=1e-5)
    # a permutation of the classes within a row changes nothing (only the sorted profile counts)
    perm = MAIN[:, [3, 1, 0, 2]]
    assert shape_regularization_loss(t(perm), t(PREV), tau).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_shape_regularization_rejects_class_mismatch():
    with pytest.raises(ValueError, match="class counts"):
        shape_regularization_loss(torch.zeros(2, 3), torch.zeros(2, 4), 4.0)


def test_combined_loss_golden():
    alpha, beta, tau_drg, tau_dsr = 0.2, 1.0, 1.0, 4.0
    ce, ce_ac = np_ce(MAIN, Y), np_ce(AC, Y)
    rg = np_tempered_kl(AC, MAIN, tau_drg)
    sr = np_tempered_kl(np.sort(PREV, 1), np.sort(MAIN[:2], 1), tau_dsr)
    loss, terms = drg_dsr_loss(
        t(MAIN), torch.tensor(Y), t(AC), t(PREV), alpha=alpha, beta=beta, tau_drg=1.0
    )
    assert loss.item() == pytest.approx(ce + ce_ac + alpha * rg + beta * sr, rel=1e-5)
    for name, value in {"ce": ce, "ce_ac": ce_ac, "rg": rg, "sr": sr}.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5)
    # DRG only / DSR only
    loss_drg, terms_drg = drg_dsr_loss(t(MAIN), torch.tensor(Y), t(AC), None, alpha=alpha)
    assert loss_drg.item() == pytest.approx(ce + ce_ac + alpha * rg, rel=1e-5)
    assert "sr" not in terms_drg
    loss_dsr, terms_dsr = drg_dsr_loss(t(MAIN), torch.tensor(Y), None, t(PREV), beta=2.0)
    assert loss_dsr.item() == pytest.approx(ce + 2.0 * sr, rel=1e-5)
    assert set(terms_dsr) == {"ce", "sr"}


# --- gradient flow --------------------------------------------------------------------------


def test_rg_teacher_detached_but_ac_gets_ce_gradient():
    main, ac = t(MAIN, grad=True), t(AC, grad=True)
    reverse_guidance_loss(main, ac, 1.0).backward()
    assert ac.grad is None
    assert main.grad is not None and main.grad.abs().sum() > 0
    main, ac = t(MAIN, grad=True), t(AC, grad=True)
    loss, _ = drg_dsr_loss(main, torch.tensor(Y), ac, None)
    loss.backward()
    # the AC's gradient is exactly its CE gradient: softmax(z') − onehot(y), over B
    onehot = np.eye(4)[Y]
    expected = (np_softmax(AC) - onehot) / len(Y)
    np.testing.assert_allclose(ac.grad.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_sr_previous_logits_detached():
    main, prev = t(MAIN, grad=True), t(PREV, grad=True)
    shape_regularization_loss(main, prev, 4.0).backward()
    assert prev.grad is None
    # the third row is trimmed: no gradient; the kept rows get one through the sorted values
    assert main.grad[2].abs().sum() == 0
    assert main.grad[:2].abs().sum() > 0


# --- the methods ----------------------------------------------------------------------------


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet8", num_classes=4, in_channels=1, width=4)


def ctx(batch_size: int = 8) -> MethodContext:
    return MethodContext(
        num_classes=4,
        num_train=16,
        train_labels=torch.arange(16) % 4,
        epochs=1,
        steps_per_epoch=2,
        device=torch.device("cpu"),
        build_model=tiny_model,
        load_model=lambda path: tiny_model(),
        config={"data": {"batch_size": batch_size}},
        input_shape=(1, 12, 12),
    )


def batch(n: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 12, 12, generator=g)
    return Batch(
        inputs=x,
        targets=torch.arange(n) % 4,
        indices=torch.arange(n),
        raw=x,
        augment=lambda r: r,
    )


def info(step: int) -> StepInfo:
    return StepInfo(epoch=0, step=step, global_step=step, epochs=1, steps_per_epoch=2)


def test_ac_built_from_stage2_and_gradient_reaches_stages_1_2():
    model = tiny_model()
    method = DRG()
    running = model.layer2[0].bn1.running_mean.clone()
    method.setup(model, ctx())
    # the dry forward leaves BatchNorm statistics and training flags alone
    assert torch.equal(model.layer2[0].bn1.running_mean, running)
    assert model.training
    assert isinstance(method.ac, AuxiliaryClassifier)
    assert method.main_optimizer_modules() == [method.ac]
    assert method.ac.out_channels == 4 * 8  # stage2 width 8 doubled twice
    assert any(k.startswith("ac.") for k in method.state_dict())
    model.train()
    method.train()
    out = method.training_step(model, batch(), info(0))
    assert out.logits.shape == (8, 4)
    assert set(out.terms) == {"ce", "ce_ac", "rg", "loss"}
    # CE of the AC alone: stages 1-2 get gradient, stage 3 and the main head do not
    model.zero_grad()
    model(batch().inputs)
    feat = method.taps["stage2"]
    nn.functional.cross_entropy(method.ac(feat), batch().targets).backward()
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert model.layer2[0].conv1.weight.grad.abs().sum() > 0
    assert model.layer3[0].conv1.weight.grad is None
    assert model.linear.weight.grad is None


def test_ac_shapes_for_preact_resnet18():
    model = build_model("preact_resnet18", num_classes=10)
    method = DRG()
    c = MethodContext(**{**ctx().__dict__, "num_classes": 10, "input_shape": (3, 32, 32)})
    method.setup(model, c)
    assert method.ac.out_channels == 512
    z = method.ac(torch.zeros(2, 128, 16, 16))
    assert z.shape == (2, 10)


def test_missing_tap_names_method_and_tap():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(4))
    with pytest.raises(ModelError, match=r"method drg_dsr.*stage2"):
        DRGDSR().setup(model, ctx())


def test_dsr_refuses_batch_size_one_and_bad_params():
    with pytest.raises(ConfigError, match=r"dsr.*batch_size"):
        DSR().setup(tiny_model(), ctx(batch_size=1))
    with pytest.raises(ConfigError, match="beta"):
        DSR(DSRParams(beta=-1.0))
    with pytest.raises(ConfigError, match="tau_drg"):
        DRGDSR(DRGDSRParams(tau_drg=0.0))
    with pytest.raises(ConfigError, match="unknown key"):
        build_method({"name": "dsr", "alpha": 0.2})


def test_dsr_skips_first_step_then_uses_previous_sorted_logits():
    model = tiny_model()
    method = DSR()
    method.setup(model, ctx())
    method.on_epoch_start(model, 0)
    b0, b1 = batch(8, 0), batch(6, 1)
    out0 = method.training_step(model, b0, info(0))
    assert out0.terms["sr"].item() == 0.0
    assert out0.loss.item() == pytest.approx(out0.terms["ce"].item())
    method.after_optimizer_step(model, b0, out0)
    assert not method.prev_sorted.requires_grad
    prev = method.prev_sorted.clone()
    assert torch.equal(prev, torch.sort(out0.logits.detach(), dim=1).values)
    out1 = method.training_step(model, b1, info(1))
    expected = np_tempered_kl(prev[:6].numpy(), np.sort(out1.logits.detach().numpy(), axis=1), 4.0)
    assert out1.terms["sr"].item() == pytest.approx(expected, rel=1e-3)
    assert out1.loss.item() == pytest.approx(out1.terms["ce"].item() + expected, rel=1e-4)
    # the previous logits survive a state_dict round trip through weights_only loading
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = DSR()
    fresh.setup(tiny_model(), ctx())
    fresh.load_state_dict(state)
    assert torch.equal(fresh.prev_sorted, prev)
    # a new epoch starts without previous logits
    method.on_epoch_start(model, 1)
    assert method.prev_sorted is None


# --- engine ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "terms"),
    [("drg", ["ce", "ce_ac", "rg"]), ("dsr", ["ce", "sr"])],
)
def test_engine_runs(tiny_dict, name, terms):
    tiny_dict["method"] = {"name": name}
    tiny_dict["train"]["epochs"] = 2
    tiny_dict["run"]["name"] = name
    final = train(config_from_dict(tiny_dict), quiet=True)
    assert final["method"] == name
    rows = metric_rows(Path(tiny_dict["run"]["out_dir"]) / name)
    assert len(rows) == 2
    for term in terms:
        assert math.isfinite(rows[0][f"train_{term}"]), term


def test_drg_dsr_end_to_end_and_exact_resume(tiny_dict):
    tiny_dict["method"] = {"name": "drg_dsr"}
    tiny_dict["train"]["epochs"] = 2
    full = assert_resume_is_exact(tiny_dict)
    for term in ("ce", "ce_ac", "rg", "sr", "loss"):
        assert f"train_{term}" in full[0], term
    assert full[0]["train_sr"] > 0


def np_f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


# --- DRG on several taps ----------------------------------------------------------------------


def test_drg_two_taps_builds_two_heads_and_loss_is_the_hand_sum():
    model = tiny_model()
    method = DRG(DRGParams(taps=["stage1", "stage2"], alpha=0.3, tau_drg=2.0))
    method.setup(model, ctx())
    assert list(method.acs) == ["stage1", "stage2"]
    assert method.acs["stage1"].out_channels == 4 * 4  # stage1 width 4 doubled twice
    assert method.acs["stage2"].out_channels == 4 * 8
    assert method.main_optimizer_modules() == [method.acs["stage1"], method.acs["stage2"]]
    keys = set(method.state_dict())
    assert any(k.startswith("ac.") for k in keys)
    assert any(k.startswith("more_acs.stage2.") for k in keys)
    b = batch()
    model.train()
    out = method.training_step(model, b, info(0))
    with FeatureTaps(model, ["stage1", "stage2"]) as taps:
        model(b.inputs)
        z1 = np_f64(method.acs["stage1"](taps["stage1"]))
        z2 = np_f64(method.acs["stage2"](taps["stage2"]))
    z, y = np_f64(out.logits), b.targets.numpy()
    expected = (
        np_ce(z, y)
        + np_ce(z1, y)
        + np_ce(z2, y)
        + 0.3 * (np_tempered_kl(z1, z, 2.0) + np_tempered_kl(z2, z, 2.0))
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.terms["rg_stage1"].item() == pytest.approx(np_tempered_kl(z1, z, 2.0), rel=1e-4)
    assert out.terms["ce_ac_stage2"].item() == pytest.approx(np_ce(z2, y), rel=1e-5)
    assert out.terms["ce_ac"].item() == pytest.approx(np_ce(z1, y) + np_ce(z2, y), rel=1e-5)
    # the stage-1 head's CE reaches stage 1 only
    model.zero_grad()
    with FeatureTaps(model, ["stage1"]) as taps:
        model(b.inputs)
        nn.functional.cross_entropy(method.acs["stage1"](taps["stage1"]), b.targets).backward()
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert model.layer2[0].conv1.weight.grad is None


def test_drg_tap_is_the_one_tap_form_of_taps():
    assert DRG(DRGParams(tap="stage3")).params.taps == ["stage3"]
    assert build_method({"name": "drg", "tap": "stage1"}).describe()["taps"] == ["stage1"]
    with pytest.raises(ConfigError, match=r"method.tap .* and method.taps .* disagree"):
        DRG(DRGParams(tap="stage3", taps=["stage1"]))
    with pytest.raises(ConfigError, match="lists a tap twice"):
        DRG(DRGParams(taps=["stage1", "stage1"]))
    with pytest.raises(ConfigError, match="non-empty list"):
        build_method({"name": "drg", "taps": []})


def test_drg_three_taps_end_to_end(tiny_dict):
    tiny_dict["method"] = {"name": "drg", "taps": ["stage1", "stage2", "stage3"]}
    tiny_dict["train"]["epochs"] = 1
    train(config_from_dict(tiny_dict), quiet=True)
    row = metric_rows(Path(tiny_dict["run"]["out_dir"]) / "tiny")[-1]
    parts = sum(row[f"train_ce_ac_stage{i}"] for i in (1, 2, 3))
    assert row["train_ce_ac"] == pytest.approx(parts, rel=1e-5)
