"""Figures over runs: reliability diagrams, t-SNE, student/superior overlay, training curves."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from selfkd.cli import main
from selfkd.config import config_from_dict
from selfkd.engine import train
from selfkd.errors import ConfigError
from selfkd.report.figures import reliability_figure, tsne_figure
from selfkd.report.predictions import Predictions, collect_predictions


def assert_png(path: Path) -> tuple[int, int]:
    """The file is a PNG PIL can open, not empty, and not a single colour."""
    assert path.is_file(), path
    assert path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > 0 and img.height > 0
        colours = img.convert("RGB").getcolors(maxcolors=1 << 24)
        size = img.size
    assert colours is not None and len(colours) > 10, f"{path} is (nearly) a single colour"
    return size


def train_run(tiny_dict: dict, name: str, method: dict, val_size: int = 8) -> Path:
    tiny_dict["run"]["name"] = name
    tiny_dict["method"] = method
    tiny_dict["data"]["val_size"] = val_size
    tiny_dict["data"]["options"]["test_per_class"] = 25  # 100 test points for t-SNE
    cfg = config_from_dict(tiny_dict)
    train(cfg, quiet=True)
    return Path(cfg.run.out_dir) / name


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_plot_every_kind_for_ce_and_aikd(tiny_dict, tmp_path, capsys):
    ce = train_run(tiny_dict, "ce", {"name": "ce"})
    aikd = train_run(tiny_dict, "aikd", {"name": "aikd"})  # trains phase 1 (superior) first

    pred = collect_predictions(aikd, superior=True)
    assert pred.test_logits.shape == (100, 4) and pred.test_features.shape[0] == 100
    assert pred.val_logits is not None and pred.temperature is not None and pred.temperature > 0
    assert pred.superior is not None and pred.superior_key == "superior"
    assert pred.superior.test_features.shape == pred.test_features.shape
    assert not torch.equal(pred.superior.test_features, pred.test_features)
    assert torch.equal(pred.superior.test_targets, pred.test_targets)

    out = tmp_path / "figs"
    assert main(["plot", str(ce), str(aikd), "--out", str(out), "--max-points", "200"]) == 0
    names = {p.name for p in out.glob("*.png")}
    assert names == {
        "curves.png",
        "reliability-ce.png",
        "reliability-aikd.png",
        "tsne-ce.png",
        "tsne-aikd.png",
        "overlay-aikd.png",  # ce learned from no superior model: no overlay
    }
    for name in names:
        width, height = assert_png(out / name)
        if name.startswith("reliability"):
            assert width > 1.5 * height  # two panels: without and with temperature scaling
    printed = capsys.readouterr().out
    assert "wrote" in printed and "overlay-aikd.png" in printed

    # one kind, a chosen set of classes
    out2 = tmp_path / "figs2"
    argv = ["plot", str(aikd), "--out", str(out2), "--kind", "tsne", "--classes", "0", "2"]
    assert main(argv) == 0
    assert [p.name for p in out2.glob("*.png")] == ["tsne-aikd.png"]
    assert_png(out2 / "tsne-aikd.png")


def test_plot_errors_exit_2_with_one_line(tiny_dict, tmp_path, capsys):
    run = train_run(tiny_dict, "ce", {"name": "ce"}, val_size=0)
    out = tmp_path / "figs"

    assert main(["plot", str(run), "--out", str(out), "--kind", "bogus"]) == 2
    assert "bogus" in one_line_error(capsys)

    assert main(["plot", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    one_line_error(capsys)

    assert main(["plot", str(run), "--out", str(out), "--classes", "7", "--kind", "tsne"]) == 2
    assert "--classes" in one_line_error(capsys)

    assert main(["plot", str(run), "--out", str(out), "--kind", "overlay"]) == 2
    assert "superior" in one_line_error(capsys)

    shutil.rmtree(run / "checkpoints")
    for kind in ("all", "reliability", "tsne"):
        assert main(["plot", str(run), "--out", str(out), "--kind", kind]) == 2
        assert "checkpoint" in one_line_error(capsys)
    # curves come from metrics.jsonl and need no checkpoint
    assert main(["plot", str(run), "--out", str(out), "--kind", "curves"]) == 0
    assert [p.name for p in out.glob("*.png")] == ["curves.png"]
    assert_png(out / "curves.png")


def fake_predictions(tmp_path: Path, n: int = 60, k: int = 12, val: bool = False) -> Predictions:
    g = torch.Generator().manual_seed(0)
    targets = torch.arange(n) % k
    logits = torch.randn(n, k, generator=g) + 3.0 * torch.nn.functional.one_hot(targets, k)
    return Predictions(
        run_dir=tmp_path,
        config={"run": {"name": "fake", "seed": 3}},
        test_logits=logits,
        test_targets=targets,
        test_features=torch.randn(n, 8, generator=g) + targets[:, None].float(),
        val_logits=logits if val else None,
        val_targets=targets if val else None,
        temperature=1.5 if val else None,
    )


def test_figure_functions_directly(tmp_path):
    pred = fake_predictions(tmp_path)
    # no validation split: only the uncalibrated panel (and a note)
    width, height = assert_png(reliability_figure("ce", [pred, pred], tmp_path / "r.png"))
    assert width < 1.5 * height
    with_ts = fake_predictions(tmp_path, val=True)
    width, height = assert_png(reliability_figure("ce", [with_ts], tmp_path / "r2.png"))
    assert width > 1.5 * height
    # default classes: the first 10 of 12; max_points subsamples
    assert_png(tsne_figure("ce", pred, tmp_path / "t.png", max_points=30))
    with pytest.raises(ConfigError, match="--classes"):
        tsne_figure("ce", pred, tmp_path / "t.png", classes=[12])
    with pytest.raises(ConfigError, match="at least 3"):
        tsne_figure("ce", fake_predictions(tmp_path, n=12), tmp_path / "t.png", classes=[0])
