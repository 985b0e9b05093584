"""AI-KD's previous-epoch predictions p_{t−1} for a batch: a prediction bank or a snapshot.

- :class:`BankSource` (``prev_source: bank``): the per-sample log-probabilities of the previous
  epoch's training forward (augmented input, train-mode BN, weights before the step) in a
  :class:`~selfkd.banks.PredictionBank`, written after every optimizer step (unmixed rows only;
  under DDP through ``MethodContext.gather``), as PS-KD does.
- :class:`SnapshotSource` (``prev_source: snapshot``): a frozen copy of the weights at the end of
  epoch t−1, run (eval mode, inference mode) on the current batch: the paper's literal reading,
  one extra forward per step. The copy is a model held by the method (:meth:`Method.hold`), so it
  stays in eval mode and moves with the method; its weights go through the method's extra state.

Epoch 0 has no previous model: both start from the one-hot labels (log-probabilities 0 at the
label, −inf elsewhere).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from selfkd.banks import Gather, PredictionBank
from selfkd.methods.base import Batch, Method, freeze, inference_logits
from selfkd.models.taps import unwrap_model

__all__ = ["BankSource", "SnapshotSource", "one_hot_log_probs"]


def one_hot_log_probs(targets: Tensor, num_classes: int) -> Tensor:
    """Log-probabilities of one-hot labels: 0 at the label, -inf elsewhere (B×K, float32)."""
    out = torch.full(
        (targets.shape[0], num_classes), float("-inf"), device=targets.device, dtype=torch.float32
    )
    return out.scatter_(1, targets.long()[:, None], 0.0)


class BankSource:
    """p_{t−1} from a prediction bank (log-probabilities by dataset index)."""

    def __init__(self, bank: PredictionBank, gather: Gather | None = None) -> None:
        self.bank = bank
        self.gather = gather

    def lookup(self, batch: Batch, logits: Tensor) -> Tensor:
        """The batch's rows (log-probabilities) on the logits' device."""
        return self.bank.lookup(batch.indices).to(logits.device, non_blocking=True)

    def write(self, batch: Batch, logits: Tensor) -> None:
        """The step's (pre-update) training predictions become next epoch's p_{t−1}; mixed rows
        are not predictions of their sample and are not written."""
        self.bank.update_unmixed(batch.indices, logits, batch.mix, gather=self.gather)


class SnapshotSource:
    """p_{t−1} from a frozen end-of-epoch copy of the student, held by ``owner``."""

    ROLE = "snapshot"

    def __init__(self, owner: Method) -> None:
        self.owner = owner
        self.build_model: Callable[[], nn.Module] | None = None
        self.device: torch.device | None = None

    @property
    def model(self) -> nn.Module | None:
        """The snapshot (eval mode, frozen), or None before the first epoch ends."""
        return self.owner.held(self.ROLE)

    def lookup(self, batch: Batch, logits: Tensor) -> Tensor:
        """The snapshot's logits on the batch (one-hot log-probabilities in epoch 0)."""
        snapshot = self.model
        if snapshot is None:  # epoch 0: no previous model, one-hot labels as the bank
            return one_hot_log_probs(batch.targets, logits.shape[1])
        return inference_logits(snapshot, batch.inputs)

    def refresh(self, weights: dict[str, Tensor], template: nn.Module | None = None) -> None:
        """Load ``weights`` into the snapshot, building it first (from ``build_model`` or a copy
        of ``template``) when there is none."""
        snapshot = self.model
        if snapshot is None:
            if self.build_model is not None:
                snapshot = self.build_model()
            elif template is not None:
                snapshot = copy.deepcopy(unwrap_model(template))
            else:
                raise RuntimeError("AI-KD cannot build a snapshot model before setup")
            if self.device is not None:
                snapshot = snapshot.to(self.device)
            self.owner.hold(self.ROLE, snapshot)
        snapshot.load_state_dict(weights)
        freeze(snapshot)

    def state(self) -> dict[str, Tensor] | None:
        """A copy of the snapshot's weights, or None when there is no snapshot yet."""
        snapshot = self.model
        if snapshot is None:
            return None
        return {k: v.detach().clone() for k, v in snapshot.state_dict().items()}

    def load(self, weights: dict[str, Tensor] | None) -> None:
        """Restore what :meth:`state` returned."""
        if weights is None:
            self.owner.release(self.ROLE)
        else:
            self.refresh(weights)
