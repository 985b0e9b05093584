"""Shared fixtures: tiny synthetic configs that train in a second or two on the CPU."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

TINY: dict[str, Any] = {
    "run": {"name": "tiny", "seed": 0, "device": "cpu", "deterministic": True, "progress": "off"},
    "data": {
        "name": "synthetic",
        "batch_size": 16,
        "eval_batch_size": 64,
        "options": {
            "num_classes": 4,
            "image_size": 12,
            "channels": 1,
            "train_per_class": 12,
            "test_per_class": 6,
        },
    },
    "model": {"name": "resnet8", "options": {"width": 4}},
    "train": {"epochs": 3, "lr": 0.05, "milestones": [0.5, 0.75]},
    "method": {"name": "ce"},
}


@pytest.fixture
def tiny_dict(tmp_path: Path) -> dict[str, Any]:
    """A config dict for a tiny synthetic run writing under ``tmp_path/runs``."""
    data = copy.deepcopy(TINY)
    data["run"]["out_dir"] = str(tmp_path / "runs")
    return data


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest single-threaded, especially on a loaded 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
