"""Self-KD methods: one module per method, all registered in :data:`METHODS`."""

from selfkd.methods import (  # noqa: F401  (importing a module registers its methods)
    aikd,
    byot,
    ce,
    cskd,
    dlb,
    drg,
    label_smoothing,
    pskd,
    stack,
    tfkd,
    zfls,
)
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
