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


# --- diagnostics (issue: how L_A moves the student) ---------------------------------------------
def np_softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(z))


def critic_grad(critic: nn.Module, z: np.ndarray) -> np.ndarray:
    """∂(−mean D(z))/∂z by autograd on a copy of the critic in eval mode (reference)."""
    critic = copy.deepcopy(critic).eval()
    x = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    (-critic(x).mean()).backward()
    return x.grad.double().numpy()


def test_diagnostics_match_hand_values() -> None:
    method, student, superior = make({"critic_norm": "layernorm"})
    s, sup = np_logits(student, IDX), np_logits(superior, IDX)
    y = LABELS[IDX].numpy()
    out = method.training_step(student, batch(IDX), info())
    t = {k: v.item() for k, v in out.terms.items()}
    for who, z in (("student", s), ("superior", sup)):
        centred = z - z.mean(axis=1, keepdims=True)
        assert t[f"{who}_logit_norm"] == pytest.approx(np.linalg.norm(z, axis=1).mean(), rel=1e-5)
        assert t[f"{who}_logit_cnorm"] == pytest.approx(
            np.linalg.norm(centred, axis=1).mean(), rel=1e-5
        )
        assert t[f"{who}_max_prob"] == pytest.approx(np_softmax(z).max(axis=1).mean(), rel=1e-5)
    g_a = critic_grad(method.critic, s)  # the critic after its update scores L_A
    g_ce = np_softmax(s)
    g_ce[np.arange(len(y)), y] -= 1.0
    g_ce /= len(y)
    n_a, n_ce = np.linalg.norm(g_a), np.linalg.norm(g_ce)
    assert t["adv_grad_ratio"] == pytest.approx(0.1 * n_a / (0.6 * n_ce), rel=1e-4)
    assert t["adv_ce_cos"] == pytest.approx((g_a * g_ce).sum() / (n_a * n_ce), rel=1e-4, abs=1e-6)
    centred = s - s.mean(axis=1, keepdims=True)
    radial = -(g_a * centred).sum() / (n_a * np.linalg.norm(centred))
    assert t["adv_radial"] == pytest.approx(radial, rel=1e-4, abs=1e-6)
    share = (g_a.mean(axis=1) ** 2).sum() * K / n_a**2
    assert t["adv_offset_share"] == pytest.approx(share, rel=1e-4, abs=1e-6)


def test_probs_critic_has_no_gradient_along_the_softmax_invariant_shift() -> None:
    method, student, _ = make({"critic_input": "probs"})
    out = method.training_step(student, batch(IDX), info())
    assert out.terms["adv_offset_share"].item() == pytest.approx(0.0, abs=1e-6)


def student_grads(params: dict, seed: int = 5) -> tuple[dict, list[torch.Tensor]]:
    torch.manual_seed(seed)  # the critic's initialization and the gradient penalty's ε
    method, student, _ = make(params)
    out = method.training_step(student, batch(IDX), info())
    out.loss.backward()
    return out.terms, [p.grad.clone() for p in student.parameters()]


def test_diagnostics_change_no_value_and_no_gradient() -> None:
    on, grads_on = student_grads({})
    off, grads_off = student_grads({"diagnostics": False})
    assert set(off) == {
        "ce", "guide", "progressive", "adversarial",
        "critic_loss", "critic_wdist", "critic_gp", "adv_skipped", "loss",
    }  # fmt: skip
    assert set(on) == set(off) | STATS | ADV_STATS
    for key in off:
        assert torch.equal(on[key], off[key]), key
    for a, b in zip(grads_on, grads_off, strict=True):
        assert torch.equal(a, b)


def test_diagnostics_make_no_host_read() -> None:
    from selfkd.engine.hostsync import count_host_reads

    method, student, _ = make()
    with count_host_reads() as reads:
        method.training_step(student, batch(IDX), info())
    assert reads.count == 0, reads.sites


# --- switches: each changes what it names and nothing else -------------------------------------
def same_except(a: dict, b: dict, changed: set[str]) -> None:
    """Terms of two steps from the same start: equal but for ``changed`` (which must differ)."""
    assert set(a) == set(b)
    for key in a:
        if key in changed:
            assert not torch.equal(a[key], b[key]), key
        else:
            assert torch.equal(a[key], b[key]), key


def test_critic_bn_mode_batch_scores_the_student_with_its_own_statistics() -> None:
    running, _ = student_grads({})
    torch.manual_seed(5)
    method, student, _ = make({"critic_bn_mode": "batch"})
    out = method.training_step(student, batch(IDX), info())
    s = torch.tensor(np_logits(student, IDX), dtype=torch.float32)
    ref = copy.deepcopy(method.critic).train()  # train-mode BN: the batch's statistics
    buffers = {k: v.clone() for k, v in method.critic.state_dict().items()}
    with torch.no_grad():
        assert out.terms["adversarial"].item() == pytest.approx(-ref(s).mean().item(), rel=1e-5)
    # scoring did not touch the running statistics, which the critic update alone wrote
    for k, v in method.critic.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    changed = {"adversarial", "loss"} | ADV_STATS
    same_except(running, out.terms, changed)
    torch.manual_seed(5)
    fresh, fresh_student, _ = make({})
    fresh.training_step(fresh_student, batch(IDX), info())
    pairs = zip(method.critic.state_dict().items(), fresh.critic.state_dict().values(), strict=True)
    for (k, a), b in pairs:
        assert torch.equal(a, b), k  # the same critic update in both modes


def test_critic_bn_mode_batch_without_batchnorm_changes_nothing() -> None:
    a, ga = student_grads({"critic_norm": "layernorm"})
    b, gb = student_grads({"critic_norm": "layernorm", "critic_bn_mode": "batch"})
    same_except(a, b, set())
    assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))


def test_log_probs_critic_input() -> None:
    torch.manual_seed(5)
    method, student, _ = make({"critic_input": "log_probs", "critic_norm": "none"})
    seen: list[torch.Tensor] = []
    method.critic.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    out = method.training_step(student, batch(IDX), info())
    assert len(seen) == 2  # one critic update (real, fake, interpolates), one L_A scoring
    n = len(IDX)
    for x in (seen[0][: 2 * n], seen[1]):  # interpolates of log-probs are not log-probs
        torch.testing.assert_close(x.logsumexp(dim=1), torch.zeros(x.shape[0]))
    s = np_logits(student, IDX)
    critic = copy.deepcopy(method.critic).eval()
    with torch.no_grad():
        ref = -critic(torch.tensor(np_log_softmax(s), dtype=torch.float32)).mean().item()
    assert out.terms["adversarial"].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    base, _ = student_grads({"critic_norm": "none"})
    for key in ("ce", "guide", "progressive", *sorted(STATS)):
        assert torch.equal(out.terms[key], base[key]), key


def test_critic_head_mean_is_the_papers_fc32_averaged() -> None:
    from selfkd.methods.critic import Critic

    critic = Critic(K, [64, 32], "batchnorm", head="mean")
    kinds = [type(m).__name__ for m in critic.net]
    assert kinds == ["Linear", "BatchNorm1d", "LeakyReLU", "Linear"]
    assert critic.net[-1].out_features == 32
    x = torch.randn(6, K)
    critic.eval()
    with torch.no_grad():
        assert torch.allclose(critic(x), critic.net(x).mean(dim=1))
    linear = Critic(K, [64, 32], "batchnorm")
    kinds = [type(m).__name__ for m in linear.net]
    assert kinds == ["Linear", "BatchNorm1d", "LeakyReLU", "Linear", "LeakyReLU", "Linear"]
    assert linear.net[-1].out_features == 1
    method, student, _ = make({"critic_head": "mean"})
    assert method.critic.head == "mean"
    out = method.training_step(student, batch(IDX), info())
    assert torch.isfinite(out.loss)
    with pytest.raises(ConfigError, match="two or more"):
        parse_params(AIKD, {"critic_head": "mean", "critic_hidden": [64]})


def test_critic_schedule_wgan_gp_values() -> None:
    torch.manual_seed(5)
    method, student, _ = make({"n_critic": 5, "critic_betas": [0.0, 0.9]})
    assert method.critic_optimizer.param_groups[0]["betas"] == (0.0, 0.9)
    assert method.critic_optimizer.param_groups[0]["lr"] == 1e-4
    out = method.training_step(student, batch(IDX), info())
    state = method.critic_optimizer.state_dict()["state"]
    assert all(int(s["step"]) == 5 for s in state.values())
    default, _ = student_grads({})
    for key in ("ce", "guide", "progressive", *sorted(STATS)):
        assert torch.equal(out.terms[key], default[key]), key


def warm(params: dict, epochs: int = 4):
    """(method, student) set up in a toy run of ``epochs`` epochs of 2 steps."""
    loaded: list[nn.Module] = []
    method = AIKD(parse_params(AIKD, {"superior": "phase1.pt", **params}))
    student = tiny(0)
    method.setup(student, toy_ctx(phase1_loader(loaded), epochs=epochs))
    method.train()
    return method, student


def test_omega_warmup_schedule_by_hand() -> None:
    # 4 epochs x 2 steps = 8 steps; L_A from epoch 1 (step 2), ramp over 0.5 x 8 = 4 steps
    method, _ = warm({"omega_start_epoch": 1, "omega_warmup": 0.5})
    got = [method.omega_at(t) for t in range(8)]
    assert got == pytest.approx([0.0, 0.0, 0.0, 0.025, 0.05, 0.075, 0.1, 0.1])
    method, _ = warm({"omega_warmup": 0.25})
    assert [method.omega_at(t) for t in range(4)] == pytest.approx([0.0, 0.05, 0.1, 0.1])
    method, _ = warm({})
    assert [method.omega_at(t) for t in range(8)] == [0.1] * 8


def test_omega_warmup_step_uses_the_effective_weight() -> None:
    method, student = warm({"omega_start_epoch": 1, "omega_warmup": 0.5, "critic_norm": "none"})
    for i, (step, omega) in enumerate(((0, 0.0), (3, 0.025), (7, 0.1))):
        out = method.training_step(student, batch(IDX), info(step))
        t = {k: v.item() for k, v in out.terms.items()}
        assert t["omega_eff"] == pytest.approx(omega)
        total = 0.6 * t["ce"] + 0.1 * t["guide"] + 0.3 * t["progressive"]
        total += omega * t["adversarial"]
        assert out.loss.item() == pytest.approx(total, rel=1e-6)
        assert (t["adv_grad_ratio"] == 0.0) == (omega == 0.0)
        # the critic trains during the warm-up too: one Adam step per student step
        counts = {int(s["step"]) for s in method.critic_optimizer.state.values()}
        assert counts == {i + 1}
    # no warm-up configured: no omega_eff term
    method, student = warm({})
    assert "omega_eff" not in method.training_step(student, batch(IDX), info()).terms


def test_epoch_zero_without_adversarial_gives_the_no_adv_gradient() -> None:
    method, student = warm({"omega_start_epoch": 1})
    out = method.training_step(student, batch(IDX), info(0))
    out.loss.backward()
    no_adv, student_b = warm({"ablation": "no_adv"})
    out_b = no_adv.training_step(student_b, batch(IDX), info(0))
    out_b.loss.backward()
    assert out.loss.item() == pytest.approx(out_b.loss.item(), rel=1e-6)
    for a, b in zip(student.parameters(), student_b.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("params", "epochs", "message"),
    [
        ({"omega_warmup": 1.5}, 4, "method.omega_warmup is a fraction of the training steps and "
         "must be in [0, 1] (a warm-up longer than the run is refused), got 1.5"),
        ({"omega_start_epoch": 4}, 4, "method.omega_start_epoch 4 leaves no epoch with L_A in a "
         "run of 4 epochs; choose a value below 4"),
        ({"omega_start_epoch": 2, "omega_warmup": 0.75}, 4, "the warm-up of omega (start at "
         "epoch 2, ramp over 0.75 of the run) ends after the run's last step (8 steps); lower "
         "method.omega_warmup or method.omega_start_epoch"),
    ],
)  # fmt: skip
def test_warmup_longer_than_the_run_is_refused(params, epochs, message) -> None:
    with pytest.raises(ConfigError) as exc:
        warm(params, epochs=epochs)
    assert str(exc.value) == message


@pytest.mark.parametrize(
    ("key", "value", "choices"),
    [
        ("critic_bn_mode", "train", "running, batch"),
        ("critic_input", "logprobs", "logits, probs, log_probs"),
        ("critic_head", "fc32", "linear, mean"),
    ],
)
def test_unknown_switch_value_names_the_choices(key, value, choices) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_params(AIKD, {key: value})
    assert str(exc.value) == f"method.{key} must be one of {choices}, got {value!r}"


def test_unknown_switch_value_from_the_cli_is_one_line(tmp_path, capsys) -> None:
    import yaml

    from helpers import TINY
    from selfkd.cli import main

    data = copy.deepcopy(TINY)
    data["run"]["out_dir"] = str(tmp_path)
    data["method"] = {"name": "aikd", "critic_head": "fc32"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["train", "-c", str(path), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: method.critic_head must be one of linear, mean, got 'fc32'"]
    assert not any(tmp_path.glob("_phase1/*"))  # refused before phase 1 trains


# --- the superior's seed -----------------------------------------------------------------------
def test_superior_seed_trains_phase1_with_another_seed() -> None:
    from helpers import TINY
    from selfkd.config import config_from_dict
    from selfkd.engine.runner import phase1_config, phase1_key

    def phase1(method: dict):
        data = copy.deepcopy(TINY)
        data["run"]["seed"] = 3
        data["method"] = method
        return phase1_config(config_from_dict(data))

    own = phase1({"name": "aikd"})
    other = phase1({"name": "aikd", "superior_seed": 11})
    ce = phase1({"name": "tfkd_self"})
    assert own.run.seed == 3 and other.run.seed == 11 and ce.run.seed == 3
    assert "-seed11-" in other.run.name and "-seed3-" in own.run.name
    assert phase1_key(own) == phase1_key(ce) != phase1_key(other)
    # the independent superior is the one the same-seed student of seed 11 would use
    assert other.run.name == phase1({"name": "aikd", "superior_seed": None}).run.name.replace(
        "seed3", "seed11"
    ).replace(phase1_key(own), phase1_key(other))
    with pytest.raises(ConfigError, match="superior_seed"):
        parse_params(AIKD, {"superior_seed": -1})


# --- selfkd plot --kind critic --------------------------------------------------------------------
def fake_run(root, name: str, method: dict, seed: int, rows: list[dict]):
    """A finished-looking run directory: resolved-enough config.yaml and metrics.jsonl."""
    import json

    import yaml

    from helpers import TINY

    data = copy.deepcopy(TINY)
    data["run"].update(name=name, seed=seed, out_dir=str(root))
    data["method"] = method
    path = root / name
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(data))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def diag_rows(scale: float, epochs: int = 4) -> list[dict]:
    keys = [
        "train_student_logit_norm", "train_student_logit_cnorm", "train_student_max_prob",
        "train_superior_logit_norm", "train_superior_logit_cnorm", "train_superior_max_prob",
        "train_critic_wdist", "train_critic_gp", "train_adv_grad_ratio", "train_adv_ce_cos",
        "train_adv_radial", "train_adv_offset_share",
    ]  # fmt: skip
    return [
        {
            "epoch": e + 1,
            "train_loss": 1.0 / (e + 1),
            **{k: scale * (e + 1 + i) for i, k in enumerate(keys)},
        }
        for e in range(epochs)
    ]


def test_plot_kind_critic_overlays_runs_without_checkpoints(tmp_path, capsys) -> None:
    from PIL import Image

    from selfkd.cli import main

    runs = tmp_path / "runs"
    ce = fake_run(runs, "ce", {"name": "ce"}, 0, [{"epoch": e, "train_loss": 1.0} for e in (1, 2)])
    a0 = fake_run(runs, "a0", {"name": "aikd"}, 0, diag_rows(1.0))
    a1 = fake_run(runs, "a1", {"name": "aikd"}, 1, diag_rows(1.2))
    probs = fake_run(runs, "p0", {"name": "aikd", "critic_input": "probs"}, 0, diag_rows(0.5))
    out = tmp_path / "figs"
    argv = ["plot", str(ce), str(a0), str(a1), str(probs), "--out", str(out), "--kind", "critic"]
    assert main(argv) == 0
    assert [p.name for p in out.glob("*.png")] == ["critic.png"]
    with Image.open(out / "critic.png") as img:
        assert img.format == "PNG" and img.width > 2 * img.height
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 24)) > 10
    assert "critic.png" in capsys.readouterr().out
    # only runs without diagnostics: a one-line error
    assert main(["plot", str(ce), "--out", str(tmp_path / "f2"), "--kind", "critic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: no run has AI-KD diagnostics in metrics.jsonl (train_student_logit_norm, ...); "
        "plot AI-KD runs trained with method.diagnostics: true"
    ]
    assert not (tmp_path / "f2" / "critic.png").exists()


def test_critic_kind_is_not_part_of_all() -> None:
    from selfkd.report.figures import _kinds

    assert _kinds("all") == ["reliability", "tsne", "overlay", "curves"]
    assert _kinds("critic") == ["critic"]
    with pytest.raises(ConfigError, match="critic"):
        _kinds("critics")
