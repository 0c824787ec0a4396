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

# the block index in a parameter name: Llama/Qwen/Gemma `model.layers.N.`, GPT-2 `transformer.h.N.`, BERT `encoder.layer.N.`
_LAYER = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")


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
            raise UserError("method: this model has no numbered blocks ('.layers.N.', '.h.N.'), so top_layers/freeze_bottom do not apply")
        if cfg.top_layers is not None:
            first = n_layers - cfg.top_layers
        elif cfg.freeze_bottom is not None:
            first = cfg.freeze_bottom
        else:
            first = n_layers  # no layer rule: only embeddings/head/patterns train
        embed, head = _embedding_names(model)
        inc = [re.compile(p) for p in cfg.patterns]
        exc = [re.compile(p) for p in cfg.exclude]
        for name, p in model.named_parameters():
            m = _LAYER.search(name)
            train = bool(m and int(m.group(1)) >= first and (cfg.norms or "norm" not in name))
            train |= cfg.embeddings and name in embed
            train |= cfg.head and name in head
            train |= any(r.search(name) for r in inc)
            train &= not any(r.search(name) for r in exc)
            p.requires_grad_(train)
        if not any(p.requires_grad for p in model.parameters()):
            raise UserError("method: the freeze settings leave no parameter to train")
        self._trained_layers = n_layers - first
        return model

    def expected_trainable(self, model: torch.nn.Module) -> int | None:
        """(trained layers) x (parameters per layer, norms optional) + embeddings and head when trained;
        no formula when name patterns decide."""
        cfg: FreezeConfig = self.cfg  # type: ignore[assignment]
        if cfg.patterns or cfg.exclude:
            return None
        per_layer: dict[int, int] = {}
        for name, p in model.named_parameters():
            if (m := _LAYER.search(name)) and (cfg.norms or "norm" not in name):
                per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + p.numel()
        sizes = [per_layer[i] for i in sorted(per_layer)]
        n = sum(sizes[len(sizes) - self._trained_layers :]) if self._trained_layers else 0
        embed, head = _embedding_names(model)
        uniq = {id(p): (name, p) for name, p in model.named_parameters()}.values()
        n += sum(p.numel() for name, p in uniq if (cfg.embeddings and name in embed) or (cfg.head and name in head))
        return n


def _embedding_names(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    """Parameter names of the input embeddings (token and learned position tables) and of the output head."""
    ids_in = {id(p) for m in (model.get_input_embeddings(),) for p in m.parameters()}  # type: ignore[operator]
    ids_in |= {id(p) for n, m in model.named_modules() if n.endswith(("wpe", "embed_positions")) for p in m.parameters()}
    out = model.get_output_embeddings()  # type: ignore[operator]
    ids_out = {id(p) for p in out.parameters()} if out is not None else set()
    names = list(model.named_parameters(remove_duplicate=False))
    return {n for n, p in names if id(p) in ids_in}, {n for n, p in names if id(p) in ids_out}
