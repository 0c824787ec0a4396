"""Batchers, one file per data shape an objective can declare (`Objective.batch_format`).

A batcher turns a raw row into a `Unit` (the sequences that must share a micro-batch: one SFT sample, a
chosen/rejected pair, k ranked responses, ...) and adds its format's own tensors to a collated batch.
The data stage picks the batcher from the objective, so an objective never receives batches of a shape it
did not ask for.
"""

from tunelab.data.batching._base import BATCHERS, Batcher, Unit, collate_units, get_batcher
from tunelab.registry import load_plugins

load_plugins(__name__, __path__)

__all__ = ["BATCHERS", "Batcher", "Unit", "collate_units", "get_batcher"]
