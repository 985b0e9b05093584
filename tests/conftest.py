"""Shared fixtures: tiny synthetic configs that train in a second or two on the CPU."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from helpers import TINY


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
