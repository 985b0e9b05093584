"""Every shipped config loads and validates; every per-method smoke config trains end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from selfkd.config import load_config
from selfkd.engine import train
from selfkd.methods import build_method

CONFIGS = Path(__file__).parents[1] / "configs"


def is_sweep(path: Path) -> bool:
    """Sweep files (``grid:``/``runs:``) are expanded by tests/test_sweep.py instead."""
    data = yaml.safe_load(path.read_text()) or {}
    return isinstance(data, dict) and ("grid" in data or "runs" in data)


ALL = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("_") and not is_sweep(p))
SMOKE = sorted(p for p in (CONFIGS / "methods").glob("*.yaml") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads_and_builds_its_method(path):
    cfg = load_config(path)
    method = build_method(cfg.method)
    assert method.name


@pytest.mark.parametrize("path", SMOKE, ids=lambda p: p.stem)
def test_smoke_config_trains(path, tmp_path):
    cfg = load_config(path, [f"run.out_dir={tmp_path}", "train.epochs=1", "run.threads=1"])
    final = train(cfg, quiet=True)
    assert final["status"] == "finished"
    assert math.isfinite(final["test_nll"])
    rows = (tmp_path / cfg.run.name / "metrics.jsonl").read_text().splitlines()
    assert math.isfinite(json.loads(rows[-1])["train_loss"])
