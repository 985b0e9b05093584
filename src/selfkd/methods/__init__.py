"""Self-KD methods: one module per method, all registered in :data:`METHODS`."""

from selfkd.methods import aikd, ce  # noqa: F401  (registers the methods)
from selfkd.methods.base import (
    METHODS,
    Batch,
    Method,
    MethodContext,
    StepInfo,
    StepOutput,
    build_method,
    method_defaults,
)

__all__ = [
    "METHODS",
    "Batch",
    "Method",
    "MethodContext",
    "StepInfo",
    "StepOutput",
    "build_method",
    "method_defaults",
]
