"""AI-KD method: hand-pinned terms, frozen superior, ablations, fallbacks and exact resume."""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from helpers import (
    IDX,
    LABELS,
    K,
    N,
    batch,
    np_log_softmax,
    np_logits,
    phase1_loader,
    tiny,
    toy_ctx,
)
from selfkd.errors import ConfigError, ModelError
from selfkd.methods.aikd import AIKD, AIKDParams
from selfkd.methods.base import (
    METHODS,
    MethodContext,
    StepInfo,
    method_defaults,
    parse_params,
)


#: per-epoch diagnostics (method.diagnostics, on by default): output statistics of the student
#: and the superior, and L_A's pull on the student's logits
STATS = {f"{who}_{stat}" for who in ("student", "superior")
         for stat in ("logit_norm", "logit_cnorm", "max_prob")}  # fmt: skip
ADV_STATS = {"adv_grad_ratio", "adv_ce_cos", "adv_radial", "adv_offset_share"}


def np_kl(teacher: np.ndarray, student: np.ndarray, tau: float) -> float:
    log_p = np_log_softmax(teacher / tau)
    log_q = np_log_softmax(student / tau)
    return float(tau**2 * (np.exp(log_p) * (log_p - log_q)).sum(axis=1).mean())


def np_ce(z: np.ndarray, y: torch.Tensor, tau: float = 1.0) -> float:
    return float(-np_log_softmax(z / tau)[np.arange(len(y)), y.numpy()].mean())


def make(params: dict | None = None, *, allow_load: bool = True):
    """(method, student, superior) with a hand-built MethodContext on the CPU."""
    loaded: list[nn.Module] = []
    ctx = toy_ctx(phase1_loader(loaded, allowed=allow_load))
    method = AIKD(parse_params(AIKD, {"superior": "phase1.pt", **(params or {})}))
    student = tiny(0)
    method.setup(student, ctx)
    method.train()
    return method, student, (loaded[0] if loaded else None)


def info(step: int = 0, epoch: int = 0) -> StepInfo:
    return StepInfo(epoch=epoch, step=step, global_step=step, epochs=2, steps_per_epoch=2)


def train_step(method, model, opt, idx, step=0):
    b = batch(idx)
    out = method.training_step(model, b, info(step))
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    method.after_optimizer_step(model, b, out)
    return out


# --- params -----------------------------------------------------------------------------------
def test_registered_with_paper_defaults() -> None:
    assert METHODS.get("ai-kd") is AIKD and METHODS.canonical("ai-kd") == "aikd"
    d = method_defaults("aikd")
    assert (d["alpha_ce"], d["alpha_g"], d["alpha_p"], d["omega"]) == (0.6, 0.1, 0.3, 0.1)
    assert (d["tau_g"], d["tau_p"], d["gp_weight"], d["critic_lr"]) == (3.0, 1.0, 10.0, 1e-4)
    assert d["critic_betas"] == [0.5, 0.9] and d["critic_hidden"] == [64, 32]
    assert d["critic_norm"] == "batchnorm" and d["prev_source"] == "bank"
    assert AIKD.teacher_param == "superior"


@pytest.mark.parametrize(
    "values",
    [
        {"critic_norm": "groupnorm"},
        {"critic_input": "features"},
        {"prev_source": "ema"},
        {"bank_dtype": "float64"},
        {"ablation": "no_guide"},
        {"tau_g": 0.0},
        {"tau_p": -1.0},
        {"n_critic": 0},
        {"alpha_g": -0.1},
        {"omega": -1.0},
        {"gp_weight": -1.0},
        {"critic_lr": 0.0},
        {"critic_betas": [0.5]},
        {"critic_hidden": []},
        {"superior": ""},
        {"ablation": "only_guide", "alpha_g": 1.5},
        {"unknown_key": 1},
    ],
)
def test_params_validation(values: dict) -> None:
    with pytest.raises(ConfigError):
        parse_params(AIKD, values)


def test_weight_sum_warning_without_renormalizing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AIKD()  # defaults sum to 1
        AIKD(AIKDParams(alpha_g=0.5, ablation="only_guide"))  # alpha_ce derived
    with pytest.warns(UserWarning, match="!= 1"):
        method = AIKD(AIKDParams(alpha_ce=1.0))
    assert method.weights["alpha_ce"] == 1.0


@pytest.mark.parametrize(
    ("ablation", "expected"),
    [
        ("none", (0.6, 0.1, 0.3, 0.1)),
        ("no_adv", (0.6, 0.1, 0.3, 0.0)),
        ("only_guide", (0.9, 0.1, 0.0, 0.0)),
        ("only_progressive", (0.7, 0.0, 0.3, 0.0)),
    ],
)
def test_ablation_weights(ablation: str, expected: tuple) -> None:
    w = AIKDParams(ablation=ablation).weights()
    got = (w["alpha_ce"], w["alpha_g"], w["alpha_p"], w["omega"])
    assert got == pytest.approx(expected)
    assert AIKD(AIKDParams(ablation=ablation)).needs_teacher() == (ablation != "only_progressive")


# --- a training step pinned to hand values ---------------------------------------------------
def test_step_terms_match_hand_values() -> None:
    method, student, superior = make({"tau_g": 3.0, "tau_p": 2.0, "critic_norm": "layernorm"})
    s = np_logits(student, IDX)
    sup = np_logits(superior, IDX)
    y = LABELS[IDX]
    out = method.training_step(student, batch(IDX), info())
    t = {k: v.item() for k, v in out.terms.items()}
    assert set(t) == {
        "ce", "guide", "progressive", "adversarial",
        "critic_loss", "critic_wdist", "critic_gp", "adv_skipped", "loss",
    } | STATS | ADV_STATS  # fmt: skip
    np.testing.assert_allclose(out.logits.detach().numpy(), s, rtol=1e-5, atol=1e-6)
    assert t["ce"] == pytest.approx(np_ce(s, y), rel=1e-5)
    assert t["guide"] == pytest.approx(np_kl(sup, s, 3.0), rel=1e-5)
    # epoch 0: the bank holds one-hot labels, L_P = τ²·(−log softmax(s/τ)_y)
    assert t["progressive"] == pytest.approx(4.0 * np_ce(s, y, tau=2.0), rel=1e-5)
    # L_A is scored by the critic after its update, frozen (eval mode)
    critic = copy.deepcopy(method.critic).eval()
    with torch.no_grad():
        adversarial = -critic(torch.tensor(s, dtype=torch.float32)).mean().item()
    assert t["adversarial"] == pytest.approx(adversarial, rel=1e-5, abs=1e-6)
    assert t["critic_loss"] == pytest.approx(-t["critic_wdist"] + 10.0 * t["critic_gp"], rel=1e-5)
    assert t["adv_skipped"] == 0.0
    total = 0.6 * t["ce"] + 0.1 * t["guide"] + 0.3 * t["progressive"] + 0.1 * t["adversarial"]
    assert out.loss.item() == pytest.approx(total, rel=1e-5)
    assert t["loss"] == pytest.approx(total, rel=1e-5)
    out.loss.backward()
    assert student[1].weight.grad is not None
    assert method.main_optimizer_modules() == []


def test_critic_gets_no_gradient_from_student_objective() -> None:
    method, student, _ = make()
    out = method.training_step(student, batch(IDX), info())
    grads_after_update = [p.grad.clone() for p in method.critic.parameters()]
    out.loss.backward()
    for before, p in zip(grads_after_update, method.critic.parameters(), strict=True):
        assert torch.equal(p.grad, before)  # untouched by the student's backward


def test_bank_written_with_pre_update_logits_and_used_next_epoch() -> None:
    method, student, _ = make({"tau_p": 2.0, "bank_dtype": "float32"})
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    pre = np_logits(student, IDX)
    train_step(method, student, opt, IDX)
    np.testing.assert_allclose(
        method.bank.lookup(IDX).numpy(), np_log_softmax(pre), rtol=1e-5, atol=1e-6
    )
    untouched = torch.tensor([1, 2, 4, 7])
    assert torch.isinf(method.bank.lookup(untouched)).sum() == len(untouched) * (K - 1)
    s = np_logits(student, IDX)
    out = method.training_step(student, batch(IDX), info(1))
    assert out.terms["progressive"].item() == pytest.approx(np_kl(pre, s, 2.0), rel=1e-5)


def test_superior_frozen_in_eval_mode_and_outside_state() -> None:
    method, student, superior = make()
    before = [p.detach().clone() for p in superior.parameters()]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for step in range(3):
        train_step(method, student, opt, IDX, step)
        method.train()
        assert not superior.training
    method.train(True)
    assert not superior.training and method.training and method.critic.training
    for b, p in zip(before, superior.parameters(), strict=True):
        assert torch.equal(b, p) and not p.requires_grad and p.grad is None
    own = {id(p) for p in method.parameters()}
    assert not any(id(p) in own for p in superior.parameters())
    assert not any(k.startswith(("superior", "_frozen")) for k in method.state_dict())
    assert method.superior is superior


# --- ablations ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ablation", "weights", "present"),
    [
        ("no_adv", (0.6, 0.1, 0.3, 0.0), {"ce", "guide", "progressive"}),
        ("only_guide", (0.9, 0.1, 0.0, 0.0), {"ce", "guide"}),
        ("only_progressive", (0.7, 0.0, 0.3, 0.0), {"ce", "progressive"}),
    ],
)
def test_ablation_removes_exactly_its_terms(ablation, weights, present) -> None:
    method, student, superior = make(
        {"ablation": ablation, "tau_g": 3.0, "tau_p": 2.0},
        allow_load=ablation != "only_progressive",
    )
    assert method.critic is None and method.critic_optimizer is None
    assert (method.bank is None) == (weights[2] == 0)
    assert (superior is None) == (ablation == "only_progressive")
    s = np_logits(student, IDX)
    y = LABELS[IDX]
    out = method.training_step(student, batch(IDX), info())
    stats = STATS if superior is not None else {"student_logit_norm", "student_logit_cnorm",
                                                 "student_max_prob"}  # fmt: skip
    assert set(out.terms) == present | {"loss"} | stats
    hand = {"ce": np_ce(s, y), "progressive": 4.0 * np_ce(s, y, tau=2.0)}
    if superior is not None:
        hand["guide"] = np_kl(np_logits(superior, IDX), s, 3.0)
    coef = dict(zip(("ce", "guide", "progressive", "adversarial"), weights, strict=True))
    for key in present:
        assert out.terms[key].item() == pytest.approx(hand[key], rel=1e-5)
    expected = sum(coef[k] * hand[k] for k in present)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


# --- fallbacks and errors --------------------------------------------------------------------
def test_batch_of_one_with_batchnorm_critic_skips_adversarial() -> None:
    method, student, _ = make()
    before = [p.detach().clone() for p in method.critic.parameters()]
    with pytest.warns(UserWarning, match="batch of one"):
        out = method.training_step(student, batch([2]), info())
    assert out.terms["adv_skipped"].item() == 1.0
    assert "adversarial" not in out.terms and "critic_loss" not in out.terms
    out.loss.backward()
    for b, p in zip(before, method.critic.parameters(), strict=True):
        assert torch.equal(b, p)
    out = method.training_step(student, batch(IDX), info(1))
    assert out.terms["adv_skipped"].item() == 0.0 and "adversarial" in out.terms


def test_batch_of_one_with_layernorm_critic_trains() -> None:
    method, student, _ = make({"critic_norm": "layernorm"})
    out = method.training_step(student, batch([2]), info())
    assert out.terms["adv_skipped"].item() == 0.0 and "adversarial" in out.terms


def test_nan_logits_show_in_the_critic_term_the_engine_watches() -> None:
    # the critic update does not read its loss back (no host sync); its NaN loss is a logged
    # term, which the engine's device-side watch records like the loss (tests/test_host_syncs.py)
    from selfkd.engine.guard import NonFiniteWatch

    method, student, _ = make()

    class NaNModel(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return student(x) * float("nan")

    out = method.training_step(NaNModel(), batch(IDX), info(7))
    assert torch.isnan(out.terms["critic_loss"])
    watch = NonFiniteWatch("cpu")
    watch.observe(out.loss, out.terms, 7)
    first = watch.first()
    assert first is not None and first.global_step == 7
    assert math.isnan(first.values["critic_loss"])


def test_superior_auto_unresolved_and_shape_mismatch() -> None:
    method = AIKD(AIKDParams())  # superior: auto
    ctx = MethodContext(K, N, LABELS, 1, 1, torch.device("cpu"), lambda: tiny(2), tiny)
    with pytest.raises(ConfigError, match="auto"):
        method.setup(tiny(0), ctx)
    method = AIKD(AIKDParams(superior="x.pt"))
    ctx.load_model = lambda path: nn.Sequential(nn.Flatten(), nn.Linear(12, K + 1))
    method.setup(tiny(0), ctx)
    with pytest.raises(ModelError):
        method.training_step(tiny(0), batch(IDX), info())


def test_probs_critic_input_feeds_softmax() -> None:
    method, student, _ = make({"critic_input": "probs", "critic_norm": "none"})
    seen: list[torch.Tensor] = []
    method.critic.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    method.training_step(student, batch(IDX), info())
    assert seen
    for x in seen:
        torch.testing.assert_close(x.sum(dim=1), torch.ones(x.shape[0]))


def test_n_critic_updates_per_step() -> None:
    method, student, _ = make({"n_critic": 3})
    method.training_step(student, batch(IDX), info())
    state = method.critic_optimizer.state_dict()["state"]
    assert all(int(s["step"]) == 3 for s in state.values())


def test_mixed_precision_autocast_cpu() -> None:
    method, student, _ = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step(student, batch(IDX), info())
    assert all(torch.isfinite(v) for v in out.terms.values())
    assert all(p.dtype == torch.float32 for p in method.critic.parameters())
    assert out.loss.dtype == torch.float32


# --- state and resume ----------------------------------------------------------------------------
def save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resume_through_state_dict_is_exact() -> None:
    method, student, _ = make()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for step in range(2):
        train_step(method, student, opt, IDX if step == 0 else torch.tensor([1, 2, 4, 7]), step)
    state = save_load(method.state_dict())
    assert "bank.table" in state and "critic_optimizer" in state["_extra_state"]
    student_state = save_load(student.state_dict())

    clone, clone_student, _ = make()
    clone_student.load_state_dict(student_state)
    clone.load_state_dict(state)
    assert torch.equal(clone.bank.table, method.bank.table)
    outs = []
    for m, s in ((method, student), (clone, clone_student)):
        torch.manual_seed(123)  # the gradient penalty's ε
        outs.append(m.training_step(s, batch(IDX), info(2)))
    for key, value in outs[0].terms.items():
        assert torch.equal(value, outs[1].terms[key]), key
    for a, b in zip(method.critic.parameters(), clone.critic.parameters(), strict=True):
        assert torch.equal(a, b)
    sa = method.critic_optimizer.state_dict()["state"]
    sb = clone.critic_optimizer.state_dict()["state"]
    for i in sa:
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i])


def test_snapshot_source() -> None:
    method, student, _ = make({"prev_source": "snapshot", "tau_p": 2.0, "omega": 0.0})
    assert method.bank is None and method.snapshot is None
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    y = LABELS[IDX]
    s0 = np_logits(student, IDX)
    out = train_step(method, student, opt, IDX)
    assert out.terms["progressive"].item() == pytest.approx(4.0 * np_ce(s0, y, 2.0), rel=1e-5)
    method.on_epoch_end(student, 0)
    snapshot = method.snapshot
    assert snapshot is not None and not snapshot.training
    assert all(not p.requires_grad for p in snapshot.parameters())
    assert not any(k.startswith("snapshot") for k in method.state_dict())
    prev = np_logits(student, IDX)  # weights at the end of epoch 0
    train_step(method, student, opt, IDX, 1)  # the snapshot does not follow the student
    s = np_logits(student, IDX)
    out = method.training_step(student, batch(IDX), info(2))
    assert out.terms["progressive"].item() == pytest.approx(np_kl(prev, s, 2.0), rel=1e-5)
    method.train()
    assert not method.snapshot.training

    state = save_load(method.state_dict())
    clone, _, _ = make({"prev_source": "snapshot", "tau_p": 2.0, "omega": 0.0})
    clone.load_state_dict(state)
    for a, b in zip(snapshot.parameters(), clone.snapshot.parameters(), strict=True):
        assert torch.equal(a, b)
    out2 = clone.training_step(student, batch(IDX), info(2))
    assert out2.terms["progressive"].item() == pytest.approx(out.terms["progressive"].item())

    # extra state given before setup is applied by setup
    late = AIKD(parse_params(AIKD, {"prev_source": "snapshot", "omega": 0.0, "superior": "p"}))
    late.set_extra_state(state["_extra_state"])
    ctx = MethodContext(K, N, LABELS, 1, 1, torch.device("cpu"), lambda: tiny(5), lambda p: tiny(1))
    late.setup(tiny(0), ctx)
    for a, b in zip(snapshot.parameters(), late.snapshot.parameters(), strict=True):
        assert torch.equal(a, b)
