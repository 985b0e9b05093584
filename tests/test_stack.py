"""Stacked methods (method: {name: stack}) and DRG on several taps: losses against hand-computed
values and the single methods on the same forward, state across resume, refusals, mixing."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from helpers import assert_resume_is_exact, metric_rows, read_final
from selfkd.cli import main
from selfkd.config import config_from_dict
from selfkd.engine import Trainer, train
from selfkd.engine.checkpoint import load_checkpoint
from selfkd.errors import ConfigError
from selfkd.methods.base import Batch, MethodContext, StepInfo, build_method
from selfkd.methods.stack import Stack
from selfkd.models import FeatureTaps, build_model


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np_softmax(z)[np.arange(len(y)), y])))


def np_kl(teacher: np.ndarray, student: np.ndarray, tau: float) -> float:
    p, q = np_softmax(teacher / tau), np_softmax(student / tau)
    return float(tau**2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def np_soft_ce(z: np.ndarray, target: np.ndarray) -> float:
    return float(-np.mean(np.sum(target * np.log(np_softmax(z)), axis=1)))


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet8", num_classes=4, in_channels=1, width=4)


def ctx(epochs: int = 2, mix: dict | None = None) -> MethodContext:
    data = {"batch_size": 8, **({"mix": mix} if mix else {})}
    return MethodContext(
        num_classes=4,
        num_train=16,
        train_labels=torch.arange(16) % 4,
        epochs=epochs,
        steps_per_epoch=2,
        device=torch.device("cpu"),
        build_model=tiny_model,
        load_model=lambda path: tiny_model(),
        config={"data": data},
        input_shape=(1, 12, 12),
    )


def batch(n: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 12, 12, generator=g)
    return Batch(
        inputs=x, targets=torch.arange(n) % 4, indices=torch.arange(n), raw=x, augment=lambda r: r
    )


def info(epoch: int, step: int) -> StepInfo:
    return StepInfo(
        epoch=epoch, step=step, global_step=2 * epoch + step, epochs=2, steps_per_epoch=2
    )


def stack(parts) -> Stack:
    method = build_method({"name": "stack", "parts": parts})
    assert isinstance(method, Stack)
    return method


def np_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# --- the loss on one forward ------------------------------------------------------------------


def test_pskd_plus_drg_is_the_sum_of_both_losses_minus_one_ce():
    model = tiny_model()
    method = stack({"pskd": {"bank_dtype": "float32"}, "drg": {"alpha": 0.2}})
    method.setup(model, ctx())
    alone_pskd = build_method({"name": "pskd", "bank_dtype": "float32"})
    alone_drg = build_method({"name": "drg", "alpha": 0.2})
    alone_pskd.setup(model, ctx())
    alone_drg.setup(model, ctx())
    alone_drg.ac.load_state_dict(method.parts["drg"].ac.state_dict())
    # last epoch's predictions for samples 0..7 (epoch 1 reads the bank)
    prev = torch.randn(8, 4, generator=torch.Generator().manual_seed(5))
    for part in (method.parts["pskd"], alone_pskd):
        part.bank.update(torch.arange(8), prev)
    b = batch()
    model.train()
    out = method.training_step(model, b, info(1, 0))
    out_p = alone_pskd.training_step(model, b, info(1, 0))
    out_d = alone_drg.training_step(model, b, info(1, 0))
    assert torch.equal(out.logits, out_p.logits) and torch.equal(out.logits, out_d.logits)
    z, y = np_of(out.logits), b.targets.numpy()
    ce = np_ce(z, y)
    assert out.loss.item() == pytest.approx(out_p.loss.item() + out_d.loss.item() - ce, abs=1e-5)
    # and by hand: PS-KD's soft-target CE + the AC's CE + α·τ²·KL(AC ‖ main), τ = 1
    with FeatureTaps(model, ["stage2"]) as taps:
        assert torch.equal(model(b.inputs), out.logits)
        z_ac = np_of(method.parts["drg"].ac(taps["stage2"]))
    alpha_t = 0.8 * 2 / 2
    target = (1 - alpha_t) * np.eye(4)[y] + alpha_t * np_softmax(np_of(prev))
    expected = np_soft_ce(z, target) + np_ce(z_ac, y) + 0.2 * np_kl(z_ac, z, 1.0)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    # terms per part, the CE counted once
    assert out.terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out.terms["pskd/pskd"].item() == pytest.approx(np_soft_ce(z, target), rel=1e-5)
    assert out.terms["drg/rg"].item() == pytest.approx(np_kl(z_ac, z, 1.0), rel=1e-4)
    assert out.terms["drg/loss"].item() == pytest.approx(out_d.loss.item(), rel=1e-6)
    # one forward: the stack's loss back-propagates into the AC and the model like the sum
    out.loss.backward()
    assert method.parts["drg"].ac.fc.weight.grad.abs().sum() > 0


def test_drg_plus_dsr_stack_equals_drg_dsr_over_two_steps():
    model = tiny_model()
    method = stack([{"name": "drg"}, {"name": "dsr"}])
    combined = build_method({"name": "drg_dsr"})
    method.setup(model, ctx())
    combined.setup(model, ctx())
    combined.ac.load_state_dict(method.parts["drg"].ac.state_dict())
    model.train()
    for step, b in enumerate([batch(8, 0), batch(8, 1)]):
        out = method.training_step(model, b, info(0, step))
        ref = combined.training_step(model, b, info(0, step))
        assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
        assert out.terms["dsr/sr"].item() == pytest.approx(ref.terms["sr"].item(), rel=1e-6)
        method.after_optimizer_step(model, b, out)
        combined.after_optimizer_step(model, b, ref)
    assert out.terms["dsr/sr"].item() > 0  # the second step used the first step's logits


def test_describe_round_trips_and_state_keys_are_per_part():
    method = stack(["pskd", {"name": "drg", "taps": ["stage1", "stage2"]}])
    described = method.describe()
    assert described["name"] == "stack" and list(described["parts"]) == ["pskd", "drg"]
    assert described["parts"]["drg"]["taps"] == ["stage1", "stage2"]
    again = build_method(copy.deepcopy(described))
    assert again.describe() == described
    method.setup(tiny_model(), ctx())
    keys = set(method.state_dict())
    assert any(k.startswith("parts.pskd.bank") for k in keys)
    assert any(k.startswith("parts.drg.ac.") for k in keys)
    assert any(k.startswith("parts.drg.more_acs.stage2.") for k in keys)
    assert len(method.main_optimizer_modules()) == 2


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ({"pskd": {}, "cskd": {}}, "cannot take part cskd: CS-KD draws its own batches"),
        ({"dlb": {}, "drg": {}}, "cannot take part dlb: DLB forwards two views"),
        ({"pskd": {}, "aikd": {}}, "cannot take part aikd: AI-KD trains its critic"),
        ({"pskd": {}, "tfkd_self": {}}, "cannot take part tfkd_self: tfkd_self learns from a "),
        ({"pskd": {}, "stack": {}}, "cannot take part stack"),
        (["pskd", "ps-kd"], "part pskd is given twice"),
        ({"pskd": {}}, "needs at least two parts, got 1"),
        ({"pskd": {}, "drg": {"alpha": -1}}, "part drg: method.alpha must be"),
        ({"pskd": {}, "drg": {"alpa": 1}}, "part drg: unknown key method.alpa"),
        ({"pskd": {}, "nope": {}}, "unknown method 'nope'"),
        ("pskd", "method.parts must list the stacked methods"),
    ],
)
def test_incompatible_or_bad_stacks_are_one_line_errors(parts, expected):
    with pytest.raises(ConfigError) as err:
        build_method({"name": "stack", "parts": parts})
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_refuses_an_incompatible_stack_with_exit_2(tmp_path, tiny_dict, capsys):
    tiny_dict["method"] = {"name": "stack", "parts": {"pskd": {}, "cskd": {}}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict))
    assert main(["train", "-c", str(config), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: method stack cannot take part cskd: CS-KD draws its own"), err
    assert "\n" not in err and "Traceback" not in err
    assert not (Path(tiny_dict["run"]["out_dir"]) / "tiny" / "config.yaml").exists()


def test_label_mixing_refused_for_a_part_without_mixed_labels(tiny_dict):
    tiny_dict["method"] = {"name": "stack", "parts": {"pskd": {}, "drg": {}}}
    tiny_dict["data"]["mix"] = {"name": "cutmix"}
    with pytest.raises(ConfigError, match=r"^method stack: part drg cannot take data.mix=cutmix"):
        Trainer(config_from_dict(tiny_dict), quiet=True)


def test_a_part_forwarding_another_input_stops_with_a_clear_error():
    model = tiny_model()
    method = stack({"pskd": {}, "drg": {}})
    method.setup(model, ctx())
    b = batch()
    twice = Batch(b.inputs.clone(), b.targets, b.indices, b.raw, b.augment)
    shared_inputs = b.inputs
    original = method.parts["drg"].training_step

    def other_input(model_, batch_, info_):
        return original(model_, twice, info_)

    method.parts["drg"].training_step = other_input
    with pytest.raises(ConfigError, match="part drg forwards an input other than the step's"):
        method.training_step(
            model, Batch(shared_inputs, b.targets, b.indices, b.raw, b.augment), info(0, 0)
        )


# --- the engine: state across resume, mixing, terms ---------------------------------------------


def test_every_part_state_survives_resume_exactly(tiny_dict):
    tiny_dict["method"] = {"name": "stack", "parts": {"pskd": {}, "drg": {}, "dsr": {}}}
    full = assert_resume_is_exact(tiny_dict, crash_after=1)
    for term in ("ce", "pskd/pskd", "drg/ce_ac", "drg/rg", "dsr/sr", "pskd/loss"):
        assert math.isfinite(full[-1][f"train_{term}"]), term
    out = Path(tiny_dict["run"]["out_dir"])
    a = load_checkpoint(out / "full" / "checkpoints" / "last.pt")["method"]
    b = load_checkpoint(out / "crashed" / "checkpoints" / "last.pt")["method"]
    assert set(a) == set(b)
    assert any(k.startswith("parts.pskd.bank") for k in a)
    assert any(k.startswith("parts.drg.ac.") for k in a)
    assert a["parts.dsr._extra_state"]["prev_sorted"] is not None
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
    prev_a = a["parts.dsr._extra_state"]["prev_sorted"]
    assert torch.equal(prev_a, b["parts.dsr._extra_state"]["prev_sorted"])
    assert read_final(out / "full")["method"] == "stack"


def test_cutout_takes_the_split_rule_of_pskd_and_runs(tiny_dict):
    tiny_dict["method"] = {"name": "stack", "parts": {"pskd": {}, "drg": {}}}
    tiny_dict["data"]["mix"] = {"name": "cutout", "size": 4}
    tiny_dict["train"]["epochs"] = 2
    train(config_from_dict(tiny_dict), quiet=True)
    run = Path(tiny_dict["run"]["out_dir"]) / "tiny"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["mix"]["split"] is True
    assert resolved["method"]["parts"]["drg"]["taps"] == ["stage2"]
    rows = metric_rows(run)
    assert math.isfinite(rows[-1]["train_pskd/mix_ce"])


def test_cutmix_composes_for_parts_that_take_mixed_labels(tiny_dict):
    tiny_dict["method"] = {"name": "stack", "parts": {"pskd": {}, "label_smoothing": {}}}
    tiny_dict["data"]["mix"] = {"name": "cutmix"}
    tiny_dict["train"]["epochs"] = 1
    final = train(config_from_dict(tiny_dict), quiet=True)
    assert math.isfinite(final["test_nll"])
