"""Partial fine-tuning by freezing: train only chosen layers or modules.

Covers "train the top-k decoder layers", "freeze the bottom K layers" (Telly-style layer freezing for code
models, Shi et al. 2023, arXiv 2305.04106: freezing the bottom layers loses little), embeddings and LM head
on/off, and regular-expression name patterns. Selection is a predicate on parameter names, applied once.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._base import Method

_LAYER = re.compile(r"\.layers\.(\d+)\.")


class FreezeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["freeze"] = "freeze"
    top_layers: int | None = Field(None, ge=0, description="train only the top N decoder layers")
    freeze_bottom: int | None = Field(None, ge=0, description="freeze the bottom K decoder layers, train the rest")
    embeddings: bool = Field(False, description="train the input embeddings")
    head: bool = Field(False, description="train the LM head (tied heads follow the embeddings)")
    norms: bool = Field(True, description="train norm layers inside trained layers")
    patterns: list[str] = Field(default_factory=list, description="regexes: matching parameter names also train")
    exclude: list[str] = Field(default_factory=list, description="regexes: matching parameter names never train")


@METHODS.register("freeze")
class Freeze(Method):
    Config = FreezeConfig

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        cfg: FreezeConfig = self.cfg  # type: ignore[assignment]
        if cfg.top_layers is not None and cfg.freeze_bottom is not None:
            raise UserError("method: set either top_layers or freeze_bottom, not both")
        n_layers = 1 + max((int(m.group(1)) for n, _ in model.named_parameters() if (m := _LAYER.search(n))), default=-1)
        if n_layers == 0 and (cfg.top_layers or cfg.freeze_bottom):
            raise UserError("method: this model has no '.layers.N.' blocks, so top_layers/freeze_bottom do not apply")
        if cfg.top_layers is not None:
            first = n_layers - cfg.top_layers
        elif cfg.freeze_bottom is not None:
            first = cfg.freeze_bottom
        else:
            first = n_layers  # no layer rule: only embeddings/head/patterns train
        inc = [re.compile(p) for p in cfg.patterns]
        exc = [re.compile(p) for p in cfg.exclude]
        for name, p in model.named_parameters():
            m = _LAYER.search(name)
            train = bool(m and int(m.group(1)) >= first and (cfg.norms or "norm" not in name))
            train |= cfg.embeddings and "embed_tokens" in name
            train |= cfg.head and "lm_head" in name
            train |= any(r.search(name) for r in inc)
            train &= not any(r.search(name) for r in exc)
            p.requires_grad_(train)
        if not any(p.requires_grad for p in model.parameters()):
            raise UserError("method: the freeze settings leave no parameter to train")
        return model
