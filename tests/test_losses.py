"""Loss functions pinned to values computed independently with numpy / plain math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from selfkd.losses import (
    adversarial_loss,
    aikd_loss,
    gradient_penalty,
    soft_target_ce,
    tempered_kl,
    wgan_critic_loss,
)

T = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
S = [[0.5, 1.5, 1.0], [2.0, 0.0, 1.0]]
Y = [1, 0]


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def np_softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(z))


def np_tempered_kl(t, s, tau: float) -> float:
    p = np_softmax(np.asarray(t) / tau)
    log_p = np.log(p)
    log_q = np_log_softmax(np.asarray(s) / tau)
    return float(tau**2 * (p * (log_p - log_q)).sum(axis=1).mean())


def np_ce(s, y) -> float:
    log_q = np_log_softmax(np.asarray(s))
    return float(-log_q[np.arange(len(y)), y].mean())


class Linear1(nn.Module):
    """D(x) = w·x + b (a critic whose gradient norm is ‖w‖ everywhere)."""

    def __init__(self, w, b: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float32))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


class Quadratic(nn.Module):
    """D(x) = a·‖x‖²/2, so ∇D(x) = a·x."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.a * (x**2).sum(dim=1)


# --- tempered KL ------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 2.0, 3.0])
def test_tempered_kl_matches_numpy(tau: float) -> None:
    got = tempered_kl(torch.tensor(T), torch.tensor(S), tau)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(np_tempered_kl(T, S, tau), rel=1e-5)


def test_tempered_kl_hand_value_tau3() -> None:
    # one row, two classes, written out: t = (0, 3), s = (0, 0), τ = 3
    p1 = math.exp(1) / (1 + math.exp(1))
    p0 = 1 - p1
    expected = 9 * (p0 * math.log(p0 / 0.5) + p1 * math.log(p1 / 0.5))
    got = tempered_kl(torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, 0.0]]), 3.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_tempered_kl_zero_for_identical_inputs_and_shift_invariant_teacher() -> None:
    s = torch.tensor(S)
    assert tempered_kl(s, s, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    # a teacher given as log-probabilities gives the same loss as its logits
    log_p = torch.log_softmax(torch.tensor(T), dim=1)
    assert tempered_kl(log_p, s, 3.0).item() == pytest.approx(np_tempered_kl(T, S, 3.0), rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_tempered_kl_one_hot_minus_inf_teacher(tau: float) -> None:
    inf = float("-inf")
    teacher = torch.tensor([[inf, 0.0, inf], [0.0, inf, inf]])
    student = torch.tensor(S, requires_grad=True)
    loss = tempered_kl(teacher, student, tau)
    log_q = np_log_softmax(np.asarray(S) / tau)
    expected = tau**2 * -log_q[np.arange(2), Y].mean()
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    # gradient of τ²·(−log softmax(s/τ)_y) averaged over 2 rows: τ·(q − onehot)/2
    q = np_softmax(np.asarray(S) / tau)
    onehot = np.eye(3)[Y]
    np.testing.assert_allclose(student.grad.numpy(), tau * (q - onehot) / 2, rtol=1e-5, atol=1e-7)


def test_tempered_kl_detaches_teacher() -> None:
    teacher = torch.tensor(T, requires_grad=True)
    student = torch.tensor(S, requires_grad=True)
    tempered_kl(teacher, student, 2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_tempered_kl_half_precision_inputs() -> None:
    got = tempered_kl(torch.tensor(T).half(), torch.tensor(S).bfloat16(), 2.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(np_tempered_kl(T, S, 2.0), rel=2e-2)


def test_tempered_kl_rejects_bad_tau() -> None:
    with pytest.raises(ValueError):
        tempered_kl(torch.tensor(T), torch.tensor(S), 0.0)


# --- soft-target CE ----------------------------------------------------------------------------
def test_soft_target_ce_matches_numpy() -> None:
    q = np.array([[0.2, 0.5, 0.3], [0.7, 0.1, 0.2]])
    got = soft_target_ce(torch.tensor(S), torch.tensor(q, dtype=torch.float32))
    expected = -(q * np_log_softmax(np.asarray(S))).sum(axis=1).mean()
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_soft_target_ce_one_hot_is_cross_entropy_and_targets_detached() -> None:
    targets = torch.eye(3)[Y].requires_grad_(True)
    logits = torch.tensor(S, requires_grad=True)
    loss = soft_target_ce(logits, targets)
    assert loss.item() == pytest.approx(np_ce(S, Y), rel=1e-6)
    loss.backward()
    assert targets.grad is None


# --- gradient penalty and critic loss ---------------------------------------------------------
REAL = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]])
FAKE = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


def test_gradient_penalty_linear_unit_norm_is_zero() -> None:
    critic = Linear1([0.6, 0.8, 0.0], 0.3)
    assert gradient_penalty(critic, REAL, FAKE).item() == pytest.approx(0.0, abs=1e-10)


def test_gradient_penalty_linear_norm_two_is_one() -> None:
    critic = Linear1([0.0, 1.2, 1.6], -1.0)  # ‖w‖ = 2 → (2 − 1)² = 1
    assert gradient_penalty(critic, REAL, FAKE).item() == pytest.approx(1.0, rel=1e-6)


def test_gradient_penalty_uses_eps_per_sample_and_trains_critic() -> None:
    eps = torch.tensor([0.25, 0.8])
    critic = Quadratic(1.5)
    gp = gradient_penalty(critic, REAL, FAKE, eps=eps)
    r, f, e = REAL.numpy(), FAKE.numpy(), eps.numpy()[:, None]
    x_hat = e * r + (1 - e) * f
    norms = 1.5 * np.linalg.norm(x_hat, axis=1)
    assert gp.item() == pytest.approx(((norms - 1) ** 2).mean(), rel=1e-6)
    gp.backward()  # create_graph=True: the penalty reaches the critic's parameter
    xn = np.linalg.norm(x_hat, axis=1)
    expected_grad = (2 * (1.5 * xn - 1) * xn).mean()
    assert critic.a.grad.item() == pytest.approx(expected_grad, rel=1e-5)


def test_gradient_penalty_generator_is_reproducible() -> None:
    critic = Quadratic(1.0)
    a = gradient_penalty(critic, REAL, FAKE, generator=torch.Generator().manual_seed(3))
    b = gradient_penalty(critic, REAL, FAKE, generator=torch.Generator().manual_seed(3))
    assert a.item() == b.item()


def test_wgan_critic_loss_linear_values() -> None:
    w, b = [0.0, 1.2, 1.6], -1.0
    critic = Linear1(w, b)
    loss, terms = wgan_critic_loss(critic, REAL, FAKE, gp_weight=10.0)
    d_real = (REAL.numpy() @ np.array(w) + b).mean()
    d_fake = (FAKE.numpy() @ np.array(w) + b).mean()
    assert terms["critic_wdist"].item() == pytest.approx(d_real - d_fake, rel=1e-6)
    assert terms["critic_gp"].item() == pytest.approx(1.0, rel=1e-6)
    assert loss.item() == pytest.approx(d_fake - d_real + 10.0, rel=1e-6)


def test_wgan_critic_loss_penalty_matches_gradient_penalty() -> None:
    eps = torch.tensor([0.1, 0.6])
    critic = Quadratic(0.7)
    loss, terms = wgan_critic_loss(critic, REAL, FAKE, gp_weight=2.0, eps=eps)
    gp = gradient_penalty(critic, REAL, FAKE, eps=eps)
    assert terms["critic_gp"].item() == pytest.approx(gp.item(), rel=1e-6)
    d_real = 0.35 * (REAL**2).sum(1).mean().item()
    d_fake = 0.35 * (FAKE**2).sum(1).mean().item()
    assert loss.item() == pytest.approx(d_fake - d_real + 2.0 * gp.item(), rel=1e-5)


def test_wgan_critic_loss_gives_no_gradient_to_inputs() -> None:
    fake = FAKE.clone().requires_grad_(True)
    real = REAL.clone().requires_grad_(True)
    critic = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.2), nn.Linear(4, 1), nn.Flatten(0))
    loss, _ = wgan_critic_loss(critic, real, fake)
    loss.backward()
    assert fake.grad is None and real.grad is None
    assert all(p.grad is not None for p in critic.parameters())


# --- adversarial loss ---------------------------------------------------------------------------
def test_adversarial_loss_value_and_gradients() -> None:
    w, b = [0.5, -1.0, 2.0], 0.25
    critic = Linear1(w, b)
    fake = FAKE.clone().requires_grad_(True)
    loss = adversarial_loss(critic, fake)
    assert loss.item() == pytest.approx(-(FAKE.numpy() @ np.array(w) + b).mean(), rel=1e-6)
    loss.backward()
    np.testing.assert_allclose(fake.grad.numpy(), -np.tile(w, (2, 1)) / 2, rtol=1e-6)
    assert critic.w.grad is None and critic.b.grad is None
    assert critic.w.requires_grad and critic.b.requires_grad  # restored


def test_adversarial_loss_restores_flags_on_exception() -> None:
    class Broken(Linear1):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    critic = Broken([1.0, 0.0, 0.0])
    critic.w.requires_grad_(False)  # a frozen parameter stays frozen
    critic.train()
    with pytest.raises(RuntimeError, match="boom"):
        adversarial_loss(critic, FAKE)
    assert critic.training
    assert not critic.w.requires_grad and critic.b.requires_grad


def test_adversarial_loss_batchnorm_critic_uses_running_stats_without_update() -> None:
    critic = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1), nn.Flatten(0))
    critic.train()
    bn = critic[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    fake = FAKE[:1].clone().requires_grad_(True)  # batch of one works in eval mode
    adversarial_loss(critic, fake).backward()
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    assert critic.training and bn.training
    assert fake.grad is not None and all(p.grad is None for p in critic.parameters())


# --- AI-KD student objective ------------------------------------------------------------------
SUP = [[2.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
PREV = [[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]]
W_CRITIC, B_CRITIC = [0.3, -0.2, 0.4], 0.1


def hand_terms(tau_g: float, tau_p: float) -> dict[str, float]:
    return {
        "ce": np_ce(S, Y),
        "guide": np_tempered_kl(SUP, S, tau_g),
        "progressive": np_tempered_kl(PREV, S, tau_p),
        "adversarial": float(-(np.asarray(S) @ np.array(W_CRITIC) + B_CRITIC).mean()),
    }


def run_aikd(weights: dict[str, float], *, critic=True, superior=True, prev=True):
    student = torch.tensor(S, requires_grad=True)
    loss, terms = aikd_loss(
        student,
        torch.tensor(Y),
        torch.tensor(SUP) if superior else None,
        torch.tensor(PREV) if prev else None,
        Linear1(W_CRITIC, B_CRITIC) if critic else None,
        tau_g=3.0,
        tau_p=2.0,
        **weights,
    )
    return student, loss, terms


def test_aikd_loss_full_objective() -> None:
    weights = {"alpha_ce": 0.6, "alpha_g": 0.1, "alpha_p": 0.3, "omega": 0.1}
    student, loss, terms = run_aikd(weights)
    hand = hand_terms(3.0, 2.0)
    assert set(terms) == {"ce", "guide", "progressive", "adversarial"}
    for key, value in hand.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-5), key
        assert not terms[key].requires_grad
    expected = 0.6 * hand["ce"] + 0.1 * hand["guide"] + 0.3 * hand["progressive"]
    expected += 0.1 * hand["adversarial"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


@pytest.mark.parametrize(
    ("weights", "present"),
    [
        (
            {"alpha_ce": 0.6, "alpha_g": 0.1, "alpha_p": 0.3, "omega": 0.0},
            {"ce", "guide", "progressive"},
        ),
        ({"alpha_ce": 0.9, "alpha_g": 0.1, "alpha_p": 0.0, "omega": 0.0}, {"ce", "guide"}),
        ({"alpha_ce": 0.7, "alpha_g": 0.0, "alpha_p": 0.3, "omega": 0.0}, {"ce", "progressive"}),
        ({"alpha_ce": 0.0, "alpha_g": 0.0, "alpha_p": 0.0, "omega": 0.5}, {"adversarial"}),
    ],
)
def test_aikd_loss_zero_weight_terms_are_not_computed(weights, present) -> None:
    # a missing input is fine when its weight is 0
    _, loss, terms = run_aikd(
        weights,
        critic=weights["omega"] > 0,
        superior=weights["alpha_g"] > 0,
        prev=weights["alpha_p"] > 0,
    )
    assert set(terms) == present
    hand = hand_terms(3.0, 2.0)
    names = {"ce": "alpha_ce", "guide": "alpha_g", "progressive": "alpha_p", "adversarial": "omega"}
    expected = sum(weights[names[k]] * hand[k] for k in present)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_aikd_loss_missing_inputs_raise() -> None:
    weights = {"alpha_ce": 0.6, "alpha_g": 0.1, "alpha_p": 0.3, "omega": 0.1}
    with pytest.raises(ValueError, match="superior"):
        run_aikd(weights, superior=False)
    with pytest.raises(ValueError, match="critic"):
        run_aikd(weights, critic=False)
    with pytest.raises(ValueError, match="prev"):
        run_aikd(weights, prev=False)


def test_aikd_loss_probs_critic_input() -> None:
    student = torch.tensor(S, requires_grad=True)
    _, terms = aikd_loss(
        student,
        torch.tensor(Y),
        None,
        None,
        Linear1(W_CRITIC, B_CRITIC),
        alpha_ce=0.0,
        alpha_g=0.0,
        alpha_p=0.0,
        omega=1.0,
        tau_g=1.0,
        tau_p=1.0,
        critic_input="probs",
    )
    expected = -(np_softmax(np.asarray(S)) @ np.array(W_CRITIC) + B_CRITIC).mean()
    assert terms["adversarial"].item() == pytest.approx(expected, rel=1e-5)
