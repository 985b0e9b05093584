"""Loss functions of the self-KD methods, usable without the training engine.

Every function takes plain tensors (and, for the adversarial losses, a critic module) and returns
a batch-mean scalar. Notation: ``z`` logits (B×K), ``p(τ) = softmax(z/τ)``, KL summed over classes
and averaged over the batch ("batchmean"), ``sg`` = stop-gradient (detach).

Distillation terms are computed in float32 whatever the input dtype, so they are safe under
mixed precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "adversarial_loss",
    "aikd_loss",
    "freeze",
    "frozen",
    "gradient_penalty",
    "soft_target_ce",
    "tempered_kl",
    "wgan_critic_loss",
]


def tempered_kl(teacher_logits: Tensor, student_logits: Tensor, tau: float) -> Tensor:
    """Temperature-scaled distillation loss of Hinton et al. (2015), AI-KD eqs. (4) and (5).

    ``τ² · mean_b Σ_k p_k (log p_k − log q_k)`` with ``p = softmax(sg(t)/τ)`` (teacher) and
    ``q = softmax(s/τ)`` (student). The τ² factor keeps gradient magnitudes comparable across
    temperatures.

    The teacher may be log-probabilities instead of logits (softmax is shift-invariant, so
    ``softmax(log p/τ)`` is the tempered teacher), including ``-inf`` entries such as the one-hot
    rows of a :class:`~selfkd.banks.PredictionBank`: classes with ``p_k = 0`` contribute exactly
    0 (the convention 0·log 0 = 0), never NaN. For a one-hot teacher of class y the loss is
    ``τ² · mean_b −log q_y``. Each teacher row needs at least one finite entry.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher and student logits differ in shape: {tuple(teacher_logits.shape)} vs "
            f"{tuple(student_logits.shape)}"
        )
    log_p = F.log_softmax(teacher_logits.detach().float() / tau, dim=1)
    log_q = F.log_softmax(student_logits.float() / tau, dim=1)
    p = log_p.exp()
    # where p == 0 the term is 0 exactly; the unselected branch (0·(−inf − log q)) gets no gradient
    pointwise = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return pointwise.sum(dim=1).mean() * (tau * tau)


def soft_target_ce(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy against soft targets (PS-KD, Kim et al. ICCV 2021, eq. (3)).

    ``mean_b Σ_k −q_k · log softmax(z)_k`` with the targets ``q`` detached. Equals the hard-label
    cross-entropy when ``q`` is one-hot.
    """
    if logits.shape != target_probs.shape:
        raise ValueError(
            f"logits and targets differ in shape: {tuple(logits.shape)} vs "
            f"{tuple(target_probs.shape)}"
        )
    log_q = F.log_softmax(logits.float(), dim=1)
    return -(target_probs.detach().float() * log_q).sum(dim=1).mean()


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradient for ``model``, for good (see :func:`frozen` for a
    ``with`` block); returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily freeze ``module``: eval mode and ``requires_grad=False`` on its parameters.

    Outputs computed inside still carry gradients to their *inputs*, but the parameters receive
    none and BatchNorm running statistics are neither used from the batch nor updated. The
    previous flags (per parameter and per submodule) are restored on exit, also on exceptions.
    """
    params = list(module.parameters())
    grad_flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in module.modules()]
    try:
        for p in params:
            p.requires_grad_(False)
        module.eval()
        yield module
    finally:
        for p, flag in zip(params, grad_flags, strict=True):
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _interpolate(
    real: Tensor, fake: Tensor, eps: Tensor | None, generator: torch.Generator | None
) -> Tensor:
    """x̂ = ε·real + (1−ε)·fake with one ε ~ U(0,1) per sample; a leaf that requires grad."""
    if real.shape != fake.shape:
        raise ValueError(
            f"real and fake differ in shape: {tuple(real.shape)} vs {tuple(fake.shape)}"
        )
    real = real.detach()
    fake = fake.detach()
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    if eps is None:
        eps = torch.rand(real.shape[0], generator=generator, device=real.device, dtype=real.dtype)
    eps = eps.to(device=real.device, dtype=real.dtype).reshape(shape)
    return (eps * real + (1 - eps) * fake).requires_grad_(True)


def _penalty(scores: Tensor, x_hat: Tensor) -> Tensor:
    """mean_b (‖∇_x̂ D(x̂)_b‖₂ − 1)², differentiable w.r.t. the critic (create_graph=True)."""
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    norms = torch.linalg.vector_norm(grad.flatten(1), ord=2, dim=1)
    return ((norms - 1) ** 2).mean()


def gradient_penalty(
    critic: nn.Module,
    real: Tensor,
    fake: Tensor,
    *,
    eps: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """WGAN-GP gradient penalty (Gulrajani et al. 2017, eq. (3); AI-KD eq. (6), last term).

    ``mean_b (‖∇_x̂ D(x̂_b)‖₂ − 1)²`` with ``x̂ = ε·real + (1−ε)·fake``, ``ε ~ U(0,1)`` drawn per
    sample (from ``generator`` if given; or pass ``eps`` of shape (B,) to fix it). ``real`` and
    ``fake`` are detached: the penalty trains the critic only (the gradient graph is kept with
    ``create_graph=True`` so the penalty can be back-propagated into the critic's parameters).
    """
    x_hat = _interpolate(real, fake, eps, generator)
    return _penalty(critic(x_hat), x_hat)


def wgan_critic_loss(
    critic: nn.Module,
    real: Tensor,
    fake: Tensor,
    gp_weight: float = 10.0,
    *,
    eps: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """WGAN-GP critic loss (Gulrajani et al. 2017; AI-KD eq. (6)).

    ``L_D = mean D(sg(fake)) − mean D(sg(real)) + λ · GP`` (see :func:`gradient_penalty`). In
    AI-KD ``real`` are the superior model's outputs and ``fake`` the student's; neither receives a
    gradient. Returns ``(L_D, terms)`` with ``terms["critic_wdist"] = mean D(real) − mean D(fake)``
    (the critic's estimate of the Wasserstein distance) and ``terms["critic_gp"]`` (unweighted),
    both detached.

    The real, fake and interpolated samples go through the critic in **one** forward pass, so a
    BatchNorm critic normalizes them with shared batch statistics (separate passes would remove
    the mean difference between real and fake that the critic should detect) and updates its
    running statistics once per call. The penalty of a critic without BatchNorm is identical to
    :func:`gradient_penalty` with the same ε.
    """
    if gp_weight < 0:
        raise ValueError(f"gp_weight must be >= 0, got {gp_weight}")
    real = real.detach()
    fake = fake.detach()
    n = real.shape[0]
    x_hat = _interpolate(real, fake, eps, generator)
    scores = critic(torch.cat([real, fake, x_hat], dim=0))
    d_real, d_fake, d_hat = scores[:n].mean(), scores[n : 2 * n].mean(), scores[2 * n :]
    gp = _penalty(d_hat, x_hat)
    loss = d_fake - d_real + gp_weight * gp
    return loss, {"critic_wdist": (d_real - d_fake).detach(), "critic_gp": gp.detach()}


def adversarial_loss(critic: nn.Module, fake: Tensor) -> Tensor:
    """Adversarial (generator) loss of WGAN, AI-KD eq. (7): ``L_A = −mean D(fake)``.

    The critic is :func:`frozen` while scoring: its parameters receive no gradient (they are set
    to ``requires_grad=False`` and restored afterwards, also on exceptions) and it runs in eval
    mode (a BatchNorm critic uses its running statistics and does not update them), while the
    gradient flows into ``fake`` (the student's outputs).
    """
    with frozen(critic):
        return -critic(fake).mean()


def aikd_loss(
    student_logits: Tensor,
    targets: Tensor,
    superior_logits: Tensor | None,
    prev_logits: Tensor | None,
    critic: nn.Module | None,
    *,
    alpha_ce: float,
    alpha_g: float,
    alpha_p: float,
    omega: float,
    tau_g: float,
    tau_p: float,
    critic_input: str = "logits",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Student objective of AI-KD (Kim, Suh et al., KBS 2024, eq. (8)).

    ``L_AI = α_CE·CE(z_t, y) + α_G·L_G + α_P·L_P + ω·L_A`` with

    - ``L_G = τ_G²·KL(p_sup(τ_G) ‖ p_t(τ_G))`` (eq. (4), guide, :func:`tempered_kl`),
    - ``L_P = τ_P²·KL(p_{t−1}(τ_P) ‖ p_t(τ_P))`` (eq. (5), progressive; ``prev_logits`` may be
      log-probabilities with ``-inf``, e.g. a bank's one-hot rows),
    - ``L_A = −mean D(z_t)`` (eq. (7), :func:`adversarial_loss`, critic frozen). With
      ``critic_input="probs"`` the critic scores ``softmax(z_t)`` instead of the logits.

    Returns ``(L_AI, terms)``; ``terms`` holds the unweighted, detached values ``ce``, ``guide``,
    ``progressive``, ``adversarial``. A term whose weight is 0 is neither computed nor reported,
    so ``superior_logits`` may be None when α_G = 0, ``prev_logits`` when α_P = 0 and ``critic``
    when ω = 0.
    """
    for name, value in (
        ("alpha_ce", alpha_ce),
        ("alpha_g", alpha_g),
        ("alpha_p", alpha_p),
        ("omega", omega),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if critic_input not in ("logits", "probs"):
        raise ValueError(f"critic_input must be 'logits' or 'probs', got {critic_input!r}")
    total = student_logits.new_zeros((), dtype=torch.float32)
    terms: dict[str, Tensor] = {}
    if alpha_ce > 0:
        ce = F.cross_entropy(student_logits.float(), targets)
        total = total + alpha_ce * ce
        terms["ce"] = ce.detach()
    if alpha_g > 0:
        if superior_logits is None:
            raise ValueError("alpha_g > 0 needs superior_logits")
        guide = tempered_kl(superior_logits, student_logits, tau_g)
        total = total + alpha_g * guide
        terms["guide"] = guide.detach()
    if alpha_p > 0:
        if prev_logits is None:
            raise ValueError("alpha_p > 0 needs prev_logits")
        progressive = tempered_kl(prev_logits, student_logits, tau_p)
        total = total + alpha_p * progressive
        terms["progressive"] = progressive.detach()
    if omega > 0:
        if critic is None:
            raise ValueError("omega > 0 needs a critic")
        fake = student_logits.float()
        if critic_input == "probs":
            fake = fake.softmax(dim=1)
        adversarial = adversarial_loss(critic, fake)
        total = total + omega * adversarial
        terms["adversarial"] = adversarial.detach()
    return total, terms
