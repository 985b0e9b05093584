"""selfkd report: grouping by setting and method, mean ± std recomputed from the runs' files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from selfkd.cli import main
from selfkd.errors import RunDirError
from selfkd.report.table import find_runs, group_runs, method_label, report


def fake_run(
    root: Path, name: str, method: dict, seed: int, top1: float | None, epochs: int = 10
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = {
        "run": {"name": name, "seed": seed},
        "data": {"name": "synthetic"},
        "model": {"name": "resnet8", "options": {"width": 4}},
        "train": {"epochs": epochs},
        "method": method,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    if top1 is not None:
        final = {
            "status": "finished",
            "test_top1_err": top1,
            "test_nll": top1 / 100,
            "test_ece": 1.0 + seed,
            "sec_per_iter": 0.1,
            "parameters": 1000,
        }
        (run / "final.json").write_text(json.dumps(final))
    return run


def test_mean_std_and_grouping(tmp_path, capsys):
    errs = {"ce": [10.0, 12.0, 11.0], "pskd": [9.0, 9.5, 10.5]}
    for method, values in errs.items():
        for seed, value in enumerate(values):
            fake_run(tmp_path, f"{method}-{seed}", {"name": method}, seed, value)
    fake_run(
        tmp_path, "aikd-0", {"name": "aikd", "ablation": "no_adv", "superior": "/x.pt"}, 0, 8.0
    )
    fake_run(tmp_path, "pskd-crashed", {"name": "pskd"}, 3, None)
    fake_run(tmp_path, "ce-other-setting", {"name": "ce"}, 0, 50.0, epochs=99)

    settings = group_runs(find_runs([tmp_path]))
    assert len(settings) == 2  # the 99-epoch run is never averaged with the others
    text = report([tmp_path])
    mean, std = statistics.fmean(errs["ce"]), statistics.stdev(errs["ce"])
    assert f"{mean:.2f} ± {std:.2f}" in text
    p_mean, p_std = statistics.fmean(errs["pskd"]), statistics.stdev(errs["pskd"])
    assert f"<u>{p_mean:.2f} ± {p_std:.2f}</u>" in text  # second best
    assert "**8.00 ± 0.00**" in text  # best
    assert "| pskd | 3 (+1 incomplete) |" in text
    assert "aikd (ablation=no_adv)" in text and "/x.pt" not in text
    assert main(["report", str(tmp_path), "--csv", str(tmp_path / "t.csv")]) == 0
    assert "pskd" in (tmp_path / "t.csv").read_text()


def test_labels_and_errors(tmp_path):
    assert method_label({"name": "aikd", "alpha_g": 0.1}) == "aikd"
    assert method_label({"name": "aikd", "critic_norm": "none"}) == "aikd (critic_norm=none)"
    with pytest.raises(RunDirError, match="does not exist"):
        find_runs([tmp_path / "nope"])
    with pytest.raises(RunDirError, match="no run directories"):
        find_runs([tmp_path])
