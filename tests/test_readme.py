"""The README's promises: its two commands exist and CI runs the test one; its API example runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def test_first_lines_give_the_two_commands_and_ci_runs_the_test_one():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    commands = [line.split("#")[0].strip() for line in first_block]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert (ROOT / "scripts" / "demo.sh").is_file() and (ROOT / "scripts" / "test.sh").is_file()
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "configs/fashion_mnist/demo.yaml" in (ROOT / "scripts" / "demo.sh").read_text()


def test_main_job_is_ai_kd_as_published_and_its_critic_variant_in_the_study_regime():
    """The demo sweep: two AI-KD students (paper defaults; critic_bn_mode batch) of the
    study regime, both learning from the same phase-1 CE model (the table's CE row)."""
    from selfkd.sweep import load_sweep

    runs = load_sweep(ROOT / "configs" / "fashion_mnist" / "demo.yaml").runs
    methods = [r.config.method for r in runs]
    assert methods == [
        {"name": "aikd", "superior": "auto"},
        {"name": "aikd", "superior": "auto", "critic_bn_mode": "batch"},
    ]
    for run in runs:
        assert run.config.data.per_class == 100 and run.config.train.epochs == 100


class _Set(Dataset):
    def __init__(self) -> None:
        self.targets = torch.arange(32) % 10
        self.images = torch.randn(32, 1, 8, 8)

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i], i


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)
    )


def test_selfkd_api_example_runs():
    block = re.search(
        r"```python\n(import torch\nfrom selfkd.api import SelfKD.*?)```", README, re.S
    ).group(1)
    train_set = _Set()
    namespace = {
        "model": _net(),
        "superior": _net(),
        "train_set": train_set,
        "epochs": 2,
        "loader": DataLoader(train_set, batch_size=8, shuffle=True),
    }
    exec(compile(block, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
    assert {"ce", "guide", "progressive", "adversarial"} <= set(namespace["terms"])
