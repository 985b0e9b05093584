"""AI-KD's critic trainer: the Wasserstein critic D, its own Adam optimizer and its two uses.

Each student step the trainer (1) takes ``n_critic`` Adam steps of the WGAN-GP critic loss
(AI-KD eq. (6), :func:`selfkd.losses.wgan_critic_loss`) on detached float32 inputs with autocast
off, and (2) scores the student for L_A = −mean D(view(z_t)) with the critic frozen (no parameter
gradient, eval mode; ``bn_mode="batch"`` normalizes a BatchNorm critic by the student batch
itself, running statistics untouched). Like a manually optimized Lightning module, it owns its
optimizer; under DDP ``reduce_grads`` (``MethodContext.reduce_grads``) averages the critic's
gradients and BatchNorm statistics over the ranks before each step, and :meth:`follow` lets a rank
without a critic batch take the others' averaged steps.

The critic itself is a submodule of the method (its weights are in the method's
``state_dict``); the optimizer's state goes through :meth:`state_dict` / :meth:`load_state_dict`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from selfkd.losses import wgan_critic_loss
from selfkd.losses.core import frozen
from selfkd.methods.base import no_autocast
from selfkd.methods.critic import Critic

__all__ = ["CRITIC_BN_MODES", "CRITIC_INPUTS", "CriticTrainer"]

CRITIC_INPUTS = ("logits", "probs", "log_probs")
CRITIC_BN_MODES = ("running", "batch")


class CriticTrainer:
    """Trains ``critic`` with its own Adam optimizer and scores the student with it."""

    def __init__(
        self,
        critic: Critic,
        *,
        lr: float,
        betas: tuple[float, float],
        n_critic: int,
        gp_weight: float,
        view: str = "logits",
        bn_mode: str = "running",
        reduce_grads: Callable[..., bool] | None = None,
    ) -> None:
        self.critic = critic
        self.optimizer = torch.optim.Adam(critic.parameters(), lr=lr, betas=betas)
        self.n_critic = n_critic
        self.gp_weight = gp_weight
        self.kind = view
        self.bn_mode = bn_mode
        self.reduce_grads = reduce_grads

    def view(self, logits: Tensor) -> Tensor:
        """What the critic sees of float32 logits: the logits, softmax or log-softmax."""
        if self.kind == "probs":
            return logits.softmax(dim=1)
        if self.kind == "log_probs":
            return logits.log_softmax(dim=1)
        return logits

    def update(self, real_logits: Tensor, fake_logits: Tensor) -> dict[str, Tensor]:
        """``n_critic`` Adam steps of the WGAN-GP loss, real = the superior's logits, fake = the
        student's (both detached, float32); the terms ``critic_loss``, ``critic_wdist``,
        ``critic_gp`` of the last step."""
        critic, optimizer = self.critic, self.optimizer
        real = self.view(real_logits.detach().float())
        fake = self.view(fake_logits.detach().float())
        critic.train()
        with no_autocast(fake_logits.device), torch.enable_grad():
            for _ in range(self.n_critic):
                # no host check here: a NaN/Inf critic loss shows in the returned terms, which the
                # engine watches on the device (selfkd.engine.guard) like the loss itself
                loss, terms = wgan_critic_loss(critic, real, fake, self.gp_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.reduce_grads is None or self.reduce_grads(critic):
                    optimizer.step()
        return {"critic_loss": loss.detach(), **terms}

    def follow(self) -> None:
        """DDP, this rank has no critic batch: take the other ranks' averaged critic steps."""
        if self.reduce_grads is None:
            return
        for _ in range(self.n_critic):
            self.optimizer.zero_grad(set_to_none=True)
            if self.reduce_grads(self.critic, active=False):
                self.optimizer.step()

    def adversarial(self, student: Tensor) -> Tensor:
        """L_A = −mean D(view(z_t)) on float32 student logits, the critic frozen."""
        with frozen(self.critic):
            scores = self.critic(self.view(student), batch_stats=self.bn_mode == "batch")
        return -scores.mean()

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state (a deep copy: tensors, dicts, lists, numbers)."""
        return clone_state(self.optimizer.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(clone_state(state))


def clone_state(value: Any) -> Any:
    """Deep copy of a state made of tensors, dicts, lists, tuples and scalars (no aliasing)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone_state(v) for v in value]
    if isinstance(value, tuple):
        return tuple(clone_state(v) for v in value)
    return value
