"""Training objectives for Hugging Face seq2seq models: CE, token LS, token-level PS-KD.

A loss hook, not a Trainer: ``objective.start_epoch(model, epoch)`` before each epoch, then
``loss, terms = objective(model, batch)`` per step, where ``batch`` holds ``input_ids``,
``attention_mask`` and ``labels`` (B×T, padding = -100) as in ``transformers``' seq2seq
examples. The model is called with ``decoder_input_ids`` built from the labels
(``model.prepare_decoder_input_ids_from_labels``) so it computes no loss of its own.

* ``ce`` — token cross-entropy over real tokens;
* ``ls`` — the same with label smoothing ε (PyTorch's: ε spread over all V classes);
* ``pskd`` — :func:`selfkd.losses.pskd.pskd_token_loss` with α_t = α_T·(epoch+1)/E and the
  previous epoch's frozen model (:class:`~selfkd.seq.snapshot.PreviousEpochModel`) as p_{t−1},
  evaluated on the same batch (no dropout); epoch 0 uses one-hot targets (plain CE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from selfkd.errors import ConfigError
from selfkd.losses.pskd import IGNORE_INDEX, pskd_alpha, pskd_token_loss, token_mask
from selfkd.seq.snapshot import PreviousEpochModel

METHODS = ("ce", "ls", "pskd")


def token_ce(logits: Tensor, labels: Tensor, smoothing: float = 0.0) -> Tensor:
    """Mean token CE over ``labels != -100`` (with label smoothing ``smoothing``)."""
    keep = token_mask(labels, None, logits)
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep].float(), labels[keep], label_smoothing=smoothing)


def decoder_inputs(model: nn.Module, labels: Tensor) -> Tensor:
    """Right-shifted decoder inputs for ``labels`` (the model's own rule)."""
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        raise ConfigError(
            f"{type(model).__name__} has no prepare_decoder_input_ids_from_labels; use a "
            "transformers encoder-decoder model (e.g. MarianMTModel, BartForConditionalGeneration)"
        )
    return prepare(labels=labels)


@dataclass
class Seq2SeqObjective:
    """The loss of one method for an HF seq2seq model (see the module docstring)."""

    method: str
    epochs: int
    alpha_T: float = 0.7
    smoothing: float = 0.1
    previous: PreviousEpochModel = field(default_factory=PreviousEpochModel)
    epoch: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"unknown seq2seq method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        if not 0.0 <= self.alpha_T <= 1.0:
            raise ConfigError(f"alpha_T must be in [0, 1], got {self.alpha_T}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        """Call before the first step of ``epoch`` (PS-KD snapshots the model here)."""
        self.epoch = epoch
        if self.method == "pskd":
            self.previous.start_epoch(model, epoch)

    @property
    def alpha_t(self) -> float:
        return pskd_alpha(self.epoch, self.epochs, self.alpha_T)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        labels = batch["labels"]
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "decoder_input_ids": decoder_inputs(model, labels),
        }
        logits = model(**inputs).logits
        if self.method == "ce":
            return token_ce(logits, labels), {}
        if self.method == "ls":
            return token_ce(logits, labels, self.smoothing), {}
        prev = self.previous.probs(**inputs)
        if prev is None:  # epoch 0: one-hot targets
            safe = labels.clamp(min=0)
            prev = F.one_hot(safe, logits.shape[-1]).float()
        loss = pskd_token_loss(logits, labels, prev, self.alpha_t, labels != IGNORE_INDEX)
        return loss, {"alpha_t": self.alpha_t}
