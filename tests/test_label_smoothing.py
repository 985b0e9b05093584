"""Label smoothing: targets and loss pinned to numpy, gradients, method step, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import selfkd.methods.label_smoothing  # noqa: F401  (registers the method)
from helpers import assert_resume_is_exact, np_log_softmax
from selfkd.config import load_config
from selfkd.errors import ConfigError
from selfkd.losses.smoothing import label_smoothing_loss, smoothed_targets
from selfkd.methods.base import (
    METHODS,
    Batch,
    MethodContext,
    StepInfo,
    build_method,
    method_defaults,
    parse_params,
)
from selfkd.methods.label_smoothing import LabelSmoothing

Z = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0], [-1.0, 1.5, 0.0, 0.3]])
Y = torch.tensor([0, 2, 3])
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "methods"


def np_targets(y: np.ndarray, k: int, eps: float, spread: str) -> np.ndarray:
    out = np.empty((len(y), k))
    for i, label in enumerate(y):
        for c in range(k):
            if spread == "all":
                out[i, c] = (1 - eps) * (c == label) + eps / k
            else:
                out[i, c] = 1 - eps if c == label else eps / (k - 1)
    return out


@pytest.mark.parametrize("spread", ["all", "others"])
def test_targets_and_loss_match_numpy(spread: str) -> None:
    t = smoothed_targets(Y, 4, 0.1, spread)
    expected = np_targets(Y.numpy(), 4, 0.1, spread)
    np.testing.assert_allclose(t.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(t.sum(1).numpy(), 1.0, rtol=1e-6)
    # label mass: 1 - eps + eps/K (all) or exactly 1 - eps (others)
    assert t[0, 0].item() == pytest.approx(0.925 if spread == "all" else 0.9)
    loss = label_smoothing_loss(Z, Y, 0.1, spread)
    want = -(expected * np_log_softmax(Z.double().numpy())).sum(1).mean()
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_epsilon_zero_is_ce_and_all_matches_torch() -> None:
    assert label_smoothing_loss(Z, Y, 0.0).item() == pytest.approx(
        F.cross_entropy(Z, Y).item(), rel=1e-6
    )
    ref = F.cross_entropy(Z, Y, label_smoothing=0.2).item()
    assert label_smoothing_loss(Z, Y, 0.2, "all").item() == pytest.approx(ref, rel=1e-6)


def test_gradient_is_softmax_minus_target() -> None:
    z = Z.clone().requires_grad_(True)
    label_smoothing_loss(z, Y, 0.1, "others").backward()
    p = np.exp(np_log_softmax(Z.double().numpy()))
    expected = (p - np_targets(Y.numpy(), 4, 0.1, "others")) / len(Y)
    np.testing.assert_allclose(z.grad.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        smoothed_targets(Y, 4, 1.5)
    with pytest.raises(ValueError, match="spread"):
        smoothed_targets(Y, 4, 0.1, "some")
    for values in ({"epsilon": -0.1}, {"epsilon": 2.0}, {"spread": "half"}, {"eps": 0.1}):
        with pytest.raises(ConfigError):
            parse_params(LabelSmoothing, values)


def test_registered_with_defaults_and_step_terms() -> None:
    assert METHODS.get("ls") is LabelSmoothing
    assert method_defaults("label_smoothing") == {
        "name": "label_smoothing",
        "epsilon": 0.1,
        "spread": "all",
    }
    method = LabelSmoothing(parse_params(LabelSmoothing, {"spread": "others"}))
    model = torch.nn.Identity()
    ctx = MethodContext(
        num_classes=4,
        num_train=3,
        train_labels=Y,
        epochs=1,
        steps_per_epoch=1,
        device=torch.device("cpu"),
        build_model=lambda: model,
        load_model=lambda path: model,
    )
    method.setup(model, ctx)
    batch = Batch(inputs=Z, targets=Y, indices=torch.arange(3), raw=Z, augment=lambda t: t)
    out = method.training_step(model, batch, StepInfo(0, 0, 0, 1, 1))
    want = -(np_targets(Y.numpy(), 4, 0.1, "others") * np_log_softmax(Z.double().numpy()))
    assert out.loss.item() == pytest.approx(want.sum(1).mean(), rel=1e-6)
    assert out.terms["ls"].item() == pytest.approx(out.loss.item())
    assert out.terms["ce"].item() == pytest.approx(F.cross_entropy(Z, Y).item(), rel=1e-6)


def test_shipped_config_builds() -> None:
    cfg = load_config(CONFIGS / "label_smoothing.yaml")
    method = build_method(cfg.method)
    assert isinstance(method, LabelSmoothing)
    assert cfg.method == method_defaults("label_smoothing")


def test_end_to_end_and_resume(tiny_dict) -> None:
    tiny_dict["method"] = {"name": "label_smoothing", "epsilon": 0.1}
    tiny_dict["train"]["epochs"] = 2
    full = assert_resume_is_exact(tiny_dict)
    assert len(full) == 2 and "train_ls" in full[0] and "train_ce" in full[0]
