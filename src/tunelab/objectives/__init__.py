"""Training objectives, one file each: a loss over a batch, with its maths as a pure tensor function."""

from tunelab.objectives._base import Objective
from tunelab.registry import Registry, load_plugins

OBJECTIVES: Registry[type[Objective]] = Registry("objective")

load_plugins(__name__, __path__)

__all__ = ["OBJECTIVES", "Objective"]
