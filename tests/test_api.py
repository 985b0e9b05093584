"""selfkd.api.SelfKD: a method driven from a user's own loop, model and data."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from selfkd.api import SelfKD
from selfkd.errors import ConfigError, ModelError


class IndexedTensors(Dataset):
    """A user's dataset that also returns each sample's index."""

    def __init__(self, n: int = 48, k: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % k
        self.x = torch.randn(n, 1, 8, 8, generator=g) + self.y.view(-1, 1, 1, 1).float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def user_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 4),
    )


def run_loop(kd: SelfKD, model: nn.Module, loader, epochs: int = 2) -> list[dict]:
    opt = torch.optim.SGD([*model.parameters(), *kd.parameters()], lr=0.1, momentum=0.9)
    history = []
    for epoch in range(epochs):
        for x, y, idx in loader:
            loss, terms = kd.loss(x, y, idx, epoch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            kd.step_done()
            history.append(terms)
        kd.epoch_done(epoch)
    return history


def test_aikd_in_a_user_loop():
    data = IndexedTensors()
    loader = DataLoader(data, batch_size=16, shuffle=True)
    model, superior = user_model(), user_model()
    kd = SelfKD(
        "aikd",
        model,
        teacher=superior,
        num_classes=4,
        num_train=len(data),
        train_labels=data.y,
        epochs=2,
        steps_per_epoch=len(loader),
    )
    before = {k: v.clone() for k, v in superior.state_dict().items()}
    history = run_loop(kd, model, loader)
    assert {"ce", "guide", "progressive", "adversarial", "critic_loss"} <= set(history[0])
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert all(torch.equal(before[k], v) for k, v in superior.state_dict().items())
    # the bank now holds the model's (finite) predictions, not the one-hot start
    assert torch.isfinite(kd.method.bank.lookup(torch.arange(len(data)))).all()


def test_pskd_bank_is_written_by_step_done():
    data = IndexedTensors()
    loader = DataLoader(data, batch_size=16, shuffle=False)
    model = user_model()
    kd = SelfKD(
        "pskd",
        model,
        num_classes=4,
        num_train=len(data),
        train_labels=data.y,
        epochs=2,
        steps_per_epoch=len(loader),
    )
    x, y, idx = next(iter(loader))
    loss, _ = kd.loss(x, y, idx, 0)
    loss.backward()
    kd.step_done()
    rows = kd.method.bank.lookup(idx)
    assert torch.isfinite(rows).all()  # one-hot rows have -inf entries; written rows do not
    untouched = kd.method.bank.lookup(torch.tensor([len(data) - 1]))
    assert torch.isinf(untouched).any()


def test_teacher_is_required_and_taps_are_checked():
    model = user_model()
    with pytest.raises(ConfigError, match="one label per training sample"):
        SelfKD(
            "pskd",
            model,
            num_classes=4,
            num_train=8,
            train_labels=torch.zeros(3),
            epochs=1,
            steps_per_epoch=1,
        )
    with pytest.raises(ConfigError, match="teacher="):
        SelfKD(
            "aikd",
            model,
            num_classes=4,
            num_train=8,
            train_labels=torch.arange(8) % 4,
            epochs=1,
            steps_per_epoch=1,
        )
    with pytest.raises(ModelError, match="drg"):
        SelfKD(
            "drg",
            model,
            num_classes=4,
            num_train=8,
            train_labels=torch.arange(8) % 4,
            epochs=1,
            steps_per_epoch=1,
            input_shape=(1, 8, 8),
        )
    with pytest.raises(ConfigError, match=r"unknown key method\.alpha_x"):
        SelfKD(
            "aikd",
            model,
            teacher=user_model(),
            num_classes=4,
            num_train=8,
            train_labels=torch.arange(8) % 4,
            epochs=1,
            steps_per_epoch=1,
            alpha_x=1,
        )
