"""Cutout / Mixup / CutMix (selfkd.data.mixing) and their losses; the split rule of PS-KD/AI-KD."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import selfkd.methods  # noqa: F401  (registers every method)
from selfkd.config import config_from_dict, load_config
from selfkd.data.mixing import Mixer, MixInfo
from selfkd.engine import Trainer, train
from selfkd.errors import ConfigError
from selfkd.losses.mixing import mixed_ce, mixed_targets, split_loss
from selfkd.methods.aikd import AIKD
from selfkd.methods.base import Batch, MethodContext, StepInfo, parse_params
from selfkd.methods.label_smoothing import LabelSmoothing
from selfkd.methods.pskd import PSKD
from selfkd.mixspec import parse_mix, split_rule

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "methods"


def images(b: int = 4, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    # strictly positive, all distinct: a zeroed or pasted pixel is always visible
    return torch.rand(b, 2, h, w, generator=torch.Generator().manual_seed(seed)) + 1.0


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def beta_replay(g: torch.Generator, alpha: float) -> float:
    """The documented Beta(α, α) draw: G1/(G1+G2) from two Gamma(α) draws (float64)."""
    gam = torch._standard_gamma(torch.full((2,), alpha, dtype=torch.float64), generator=g)
    return float(gam[0] / gam.sum())


# --- the augmentations ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_cutmix_box_and_lambda_by_hand(seed: int) -> None:
    x, y = images(), torch.arange(4)
    out, mix = Mixer("cutmix", alpha=1.0).apply(x, y, generator=gen(seed))
    # replay the documented draws: permutation, λ0, box centre (row, column)
    g = gen(seed)
    perm = torch.randperm(4, generator=g).tolist()
    lam0 = beta_replay(g, 1.0)
    cy = int(torch.randint(0, 8, (), generator=g))
    cx = int(torch.randint(0, 8, (), generator=g))
    half = math.floor(8 * math.sqrt(1 - lam0)) // 2
    y1, y2 = min(max(cy - half, 0), 8), min(max(cy + half, 0), 8)
    x1, x2 = min(max(cx - half, 0), 8), min(max(cx + half, 0), 8)
    want = x.numpy().copy()
    for i in range(4):
        for r in range(y1, y2):
            for c in range(x1, x2):
                want[i, :, r, c] = x.numpy()[perm[i], :, r, c]
    assert mix is not None
    assert mix.index.tolist() == perm and bool(mix.rows.all())
    np.testing.assert_array_equal(out.numpy(), want)
    assert float(mix.lam) == pytest.approx(1 - (y2 - y1) * (x2 - x1) / 64)


def test_cutmix_pasted_area_matches_lambda() -> None:
    x, y = images(b=6, h=10, w=10, seed=3), torch.arange(6)
    for seed in range(8):
        out, mix = Mixer("cutmix").apply(x, y, generator=gen(seed))
        assert mix is not None
        changed = (out != x).any(1)  # B×H×W
        moved = mix.index != torch.arange(6)
        if bool(moved.any()):
            area = int(changed[moved][0].sum())
            assert float(mix.lam) == pytest.approx(1 - area / 100)
            assert torch.equal(changed[moved], changed[moved][:1].expand_as(changed[moved]))


def test_mixup_is_a_convex_combination() -> None:
    x, y = images(b=5, seed=1), torch.arange(5)
    out, mix = Mixer("mixup", alpha=0.4).apply(x, y, generator=gen(7))
    g = gen(7)
    perm = torch.randperm(5, generator=g).tolist()
    lam = beta_replay(g, 0.4)
    assert mix is not None and mix.index.tolist() == perm
    assert float(mix.lam) == pytest.approx(lam, rel=1e-6) and 0 < lam < 1
    xn = x.double().numpy()
    want = lam * xn + (1 - lam) * xn[perm]
    np.testing.assert_allclose(out.double().numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("size", [3, 4])
def test_cutout_zeroes_one_square_per_sample(size: int) -> None:
    x, y = images(b=8, h=9, w=7, seed=2), torch.arange(8)
    out, mix = Mixer("cutout", size=size).apply(x, y, generator=gen(5))
    assert mix is None  # labels unchanged
    g = gen(5)
    cy = torch.randint(0, 9, (8, 1), generator=g).flatten().tolist()
    cx = torch.randint(0, 7, (8, 1), generator=g).flatten().tolist()
    for i in range(8):
        hole = np.zeros((9, 7), dtype=bool)
        r0, c0 = cy[i] - size // 2, cx[i] - size // 2
        hole[max(r0, 0) : max(r0 + size, 0), max(c0, 0) : max(c0 + size, 0)] = True
        zero = (out[i] == 0).all(0).numpy()
        np.testing.assert_array_equal(zero, hole)  # one square, clipped at the border
        np.testing.assert_array_equal(out[i].numpy()[:, ~hole], x[i].numpy()[:, ~hole])


def test_cutout_default_size_is_half_the_side() -> None:
    mixer = Mixer.from_config({"name": "cutout"}, image_size=32)
    assert mixer is not None and mixer.size == 16
    assert mixer.describe(split=False) == {
        "name": "cutout",
        "size": 16,
        "prob": 1.0,
        "split": False,
    }


@pytest.mark.parametrize("name", ["cutout", "mixup", "cutmix"])
def test_split_mixes_half_and_leaves_the_rest_bit_identical(name: str) -> None:
    x, y = images(b=7, seed=4), torch.arange(7)
    for seed in range(4):
        out, mix = Mixer(name, size=4).apply(x, y, generator=gen(seed), split=True)
        assert mix is not None
        rows = mix.rows
        assert int(rows.sum()) == 3  # ⌊7/2⌋
        assert torch.equal(out[~rows], x[~rows])  # bit-identical
        assert torch.equal(mix.index[~rows], torch.arange(7)[~rows])
        assert set(mix.index[rows].tolist()) == set(torch.nonzero(rows).flatten().tolist())
        if name == "cutout":
            assert float(mix.lam) == 1.0  # cut rows train with plain CE
            assert bool((out[rows] == 0).any())


def test_prob_zero_never_mixes_and_prob_draws_from_the_generator() -> None:
    x, y = images(), torch.arange(4)
    out, mix = Mixer("cutmix", prob=0.0).apply(x, y, generator=gen(0))
    assert mix is None and out is x
    hits = [
        Mixer("mixup", prob=0.5).apply(x, y, generator=gen(s))[1] is not None for s in range(40)
    ]
    assert 5 < sum(hits) < 35


# --- losses -----------------------------------------------------------------------------------
Z = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-1.0, 1.5, 0.0], [0.3, 0.3, -0.4]])
Y = torch.tensor([0, 2, 1, 2])
MIX = MixInfo(
    index=torch.tensor([2, 1, 0, 3]),
    lam=torch.tensor(0.7),
    rows=torch.tensor([True, False, True, False]),
)


def np_nll(z: np.ndarray) -> np.ndarray:
    m = z.max(1, keepdims=True)
    return -(z - m - np.log(np.exp(z - m).sum(1, keepdims=True)))  # −log softmax


def test_mixed_ce_golden_value() -> None:
    nll = np_nll(Z.double().numpy())
    # row 0: 0.7·(−log p0[0]) + 0.3·(−log p0[y2=1]); row 2: 0.7·(−log p2[1]) + 0.3·(−log p2[y0=0])
    r0 = 0.7 * nll[0, 0] + 0.3 * nll[0, 1]
    r2 = 0.7 * nll[2, 1] + 0.3 * nll[2, 0]
    assert mixed_ce(Z, Y, MIX).item() == pytest.approx((r0 + r2) / 2, rel=1e-6)
    # over the whole batch, unmixed rows with their plain CE
    whole = (r0 + r2 + nll[1, 2] + nll[3, 2]) / 4
    assert mixed_ce(Z, Y, MIX, rows_only=False).item() == pytest.approx(whole, rel=1e-6)
    assert mixed_ce(Z, Y, None).item() == pytest.approx(nll[np.arange(4), Y.numpy()].mean())
    assert split_loss(torch.tensor(2.0), torch.tensor(5.0), MIX).item() == pytest.approx(3.5)


def test_mixed_targets_smooth_both_labels() -> None:
    t = mixed_targets(Y, MIX, 3, epsilon=0.3).numpy()
    s = lambda k: 0.7 * np.eye(3)[k] + 0.1  # noqa: E731  (ε/K = 0.1)
    np.testing.assert_allclose(t[0], 0.7 * s(0) + 0.3 * s(1), rtol=1e-6)
    np.testing.assert_allclose(t[1], s(2), rtol=1e-6)
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)


def test_mixed_ce_gradient_reaches_logits() -> None:
    z = Z.clone().requires_grad_(True)
    mixed_ce(z, Y, MIX).backward()
    assert z.grad is not None
    assert torch.equal(z.grad[1], torch.zeros(3)) and torch.equal(z.grad[3], torch.zeros(3))
    p = torch.softmax(Z.double(), 1).numpy()
    want0 = (p[0] - 0.7 * np.eye(3)[0] - 0.3 * np.eye(3)[1]) / 2
    np.testing.assert_allclose(z.grad[0].numpy(), want0, rtol=1e-5, atol=1e-7)


# --- methods ----------------------------------------------------------------------------------
N, K = 8, 3
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
X = torch.randn(N, 12, generator=gen(0))


def tiny(seed: int) -> nn.Module:
    model = nn.Linear(12, K)
    with torch.no_grad():
        model.weight.copy_(0.5 * torch.randn(K, 12, generator=gen(seed)))
        model.bias.zero_()
    return model


def ctx() -> MethodContext:
    return MethodContext(K, N, LABELS, 4, 2, torch.device("cpu"), lambda: tiny(9), tiny)


def mixed_batch(idx: torch.Tensor, rows: list[bool]) -> Batch:
    mix = MixInfo(index=torch.tensor([1, 0, 2, 3]), lam=torch.tensor(0.6), rows=torch.tensor(rows))
    x = X[idx]
    return Batch(inputs=x, targets=LABELS[idx], indices=idx, raw=x, augment=lambda t: t, mix=mix)


def info(epoch: int) -> StepInfo:
    return StepInfo(epoch=epoch, step=0, global_step=0, epochs=4, steps_per_epoch=2)


IDX = torch.tensor([5, 2, 7, 0])
ROWS = [True, True, False, False]  # rows 0, 1 mixed (partners of each other), 2, 3 untouched


def split_golden(model: nn.Module, b: Batch) -> float:
    z = model(b.inputs).detach().double().numpy()
    nll = np_nll(z)
    y = b.targets.numpy()
    mix = 0.6 * (nll[0, y[0]] + nll[1, y[1]]) / 2 + 0.4 * (nll[0, y[1]] + nll[1, y[0]]) / 2
    own = (nll[2, y[2]] + nll[3, y[3]]) / 2  # epoch 0: the one-hot bank, L_method = CE
    return (2 * own + 2 * mix) / 4


@pytest.mark.parametrize("method_cls", [PSKD, AIKD])
def test_split_loss_and_bank_rows_written_only_for_unmixed(method_cls) -> None:
    params = {"bank_dtype": "float32"}
    if method_cls is AIKD:  # L_AI with a one-hot bank at epoch 0 is the CE; no superior needed
        params["ablation"] = "only_progressive"
    method = method_cls(parse_params(method_cls, params))
    model = tiny(0)
    method.setup(model, ctx())
    before = method.bank.table.clone()
    b = mixed_batch(IDX, ROWS)
    out = method.training_step(model, b, info(0))
    assert out.loss.item() == pytest.approx(split_golden(model, b), rel=1e-5)
    assert "mix_ce" in out.terms and out.logits.shape == (4, K)
    method.after_optimizer_step(model, b, out)
    table = method.bank.table
    z = out.logits.detach()
    np.testing.assert_allclose(table[IDX[2:]].numpy(), torch.log_softmax(z[2:], 1).numpy(), 1e-5)
    untouched = torch.tensor([i for i in range(N) if i not in IDX[2:].tolist()])
    assert torch.equal(table[untouched], before[untouched])  # mixed rows 5, 2 not written


def test_label_smoothing_with_mix() -> None:
    method = LabelSmoothing(parse_params(LabelSmoothing, {"epsilon": 0.3}))
    model = tiny(1)
    method.setup(model, ctx())
    b = mixed_batch(IDX, [True, True, True, True])
    out = method.training_step(model, b, info(0))
    z = model(b.inputs).detach().double().numpy()
    y = b.targets.numpy()
    s = 0.7 * np.eye(K)[y] + 0.1
    t = 0.6 * s + 0.4 * s[[1, 0, 2, 3]]
    want = float((t * np_nll(z)).sum(1).mean())
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert set(out.terms) == {"ls", "ce", "mix_ce"}


# --- config and engine ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mix, match",
    [
        ({"name": "cutmx"}, "did you mean: cutmix"),
        ({"name": "cutmix", "alpah": 1.0}, "did you mean: alpha"),
        ({"name": "mixup", "prob": 1.5}, "prob"),
        ({"name": "mixup", "alpha": 0}, "alpha"),
        ({"name": "cutmix", "size": 8}, "cutout only"),
        ({"alpha": 1.0}, "needs a name"),
    ],
)
def test_bad_mix_config(tiny_dict, mix, match) -> None:
    tiny_dict["data"]["mix"] = mix
    with pytest.raises(ConfigError, match=match):
        config_from_dict(tiny_dict)


def test_method_without_mixing_refuses_cutmix(tiny_dict) -> None:
    tiny_dict["method"] = {"name": "dlb"}
    tiny_dict["data"]["mix"] = {"name": "cutmix"}
    with pytest.raises(ConfigError, match=r"method dlb cannot take data.mix=cutmix \("):
        Trainer(config_from_dict(tiny_dict), quiet=True)
    assert not (Path(tiny_dict["run"]["out_dir"]) / "tiny").exists()
    # cutout changes no label: every method takes it, on the whole batch
    cutout = parse_mix({"name": "cutout"})
    assert cutout is not None and split_rule(cutout, "dlb", "none") is False
    assert split_rule(cutout, "pskd", "split") is True
    with pytest.raises(ConfigError, match="split rule"):
        split_rule(parse_mix({"name": "cutmix", "split": False}), "pskd", "split")


def rows_of(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(x).items() if "seconds" not in k and "per_iter" not in k}
        for x in lines
    ]


def test_ce_mixup_end_to_end(tiny_dict) -> None:
    tiny_dict["train"]["epochs"] = 2
    tiny_dict["data"]["mix"] = {"name": "mixup", "alpha": 0.2}
    train(config_from_dict(tiny_dict), quiet=True)
    run = Path(tiny_dict["run"]["out_dir"]) / "tiny"
    rows = rows_of(run)
    assert len(rows) == 2 and all(math.isfinite(r["train_mix_ce"]) for r in rows)
    assert rows[0]["train_mix_ce"] == pytest.approx(rows[0]["train_loss"])
    resolved = load_config(run / "config.yaml")  # the resolved config is a valid config
    assert resolved.data.mix == {"name": "mixup", "alpha": 0.2, "prob": 1.0, "split": False}


def test_pskd_cutmix_end_to_end_and_exact_resume(tiny_dict) -> None:
    tiny_dict["train"]["epochs"] = 2
    tiny_dict["method"] = {"name": "pskd"}
    tiny_dict["data"]["mix"] = {"name": "cutmix"}
    tiny_dict["run"]["name"] = "full"
    train(config_from_dict(tiny_dict), quiet=True)
    out = Path(tiny_dict["run"]["out_dir"])
    full = rows_of(out / "full")
    assert all("train_pskd" in r and "train_mix_ce" in r for r in full)
    assert load_config(out / "full" / "config.yaml").data.mix["split"] is True

    class Stop(Exception):
        pass

    def stop(trainer, epoch):
        if epoch == 1:
            raise Stop

    tiny_dict["run"]["name"] = "crashed"
    cfg = config_from_dict(tiny_dict)
    with pytest.raises(Stop):
        Trainer(cfg, quiet=True, callbacks=[stop]).fit()
    train(cfg, resume=True, quiet=True)
    assert rows_of(out / "crashed") == full  # same boxes, same bank after the resume


def test_aikd_cutmix_end_to_end(tiny_dict) -> None:
    tiny_dict["train"]["epochs"] = 2
    tiny_dict["method"] = {"name": "aikd"}
    tiny_dict["data"]["mix"] = {"name": "cutmix"}
    final = train(config_from_dict(tiny_dict), quiet=True)
    assert final["status"] == "finished"
    rows = rows_of(Path(tiny_dict["run"]["out_dir"]) / "tiny")
    for key in ("train_mix_ce", "train_guide", "train_progressive", "train_critic_loss"):
        assert all(math.isfinite(r[key]) for r in rows), key


def test_shipped_configs_build() -> None:
    for name, method in (("pskd_cutmix", "pskd"), ("aikd_cutmix", "aikd")):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.method["name"] == method and cfg.data.mix["name"] == "cutmix"
