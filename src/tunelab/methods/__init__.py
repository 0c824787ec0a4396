"""Tuning methods, one file each: which parameters train and how the model is wrapped."""

from tunelab.methods._base import Method
from tunelab.registry import Registry, load_plugins

METHODS: Registry[type[Method]] = Registry("method")

load_plugins(__name__, __path__)

__all__ = ["METHODS", "Method"]
