"""The training engine: trainer loop, checkpoints, run directories, devices, schedules."""

from selfkd.engine.runner import train
from selfkd.engine.trainer import Trainer

__all__ = ["Trainer", "train"]
