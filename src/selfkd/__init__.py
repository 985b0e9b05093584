"""selfkd: self-knowledge distillation for image classifiers.

AI-KD and the methods it is compared with, under one training engine.
``selfkd.load_model(RUN)`` returns a run's trained model without its dataset.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def __getattr__(name: str) -> Any:
    # imported on first use, so that `import selfkd` stays light (no torch)
    if name == "load_model":
        from selfkd.engine.export import load_model

        return load_model
    raise AttributeError(f"module 'selfkd' has no attribute {name!r}")
