"""Fine-tuning stability options usable with any method: layer-wise learning-rate decay and re-initialising the
top layers (Tinn et al., "Fine-tuning large neural language models for biomedical natural language processing",
Patterns 2023, arXiv 2112.07869; LLRD also in Howard & Ruder 2018 and Sun et al. 2019).

- `train.layer_lr_decay` (xi in (0, 1]): block l of L (0 = bottom) trains with lr * xi^(L - 1 - l); the input
  embeddings (and learned position tables) with lr * xi^L; everything above the blocks (final norm, head) with
  the full lr. Applied to the method's own parameter groups, so a method's per-group learning rates are scaled,
  not replaced.
- `train.reinit_top_layers` (k): the top k blocks are re-initialised before tuning: Linear and GPT-2 Conv1D
  weights from N(0, initializer_range^2) (the model config's, default 0.02), biases zero, norm gains one and
  biases zero. Ours: the paper re-initialises BERT's pooler and top layers; for causal LMs there is no pooler.
  Re-initialised weights must all train (full, freeze over those layers), else the run would keep random frozen
  weights: that is a user error.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from tunelab.errors import UserError

# the block index in a parameter name: Llama/Qwen/Gemma `model.layers.N.`, GPT-2 `transformer.h.N.`, BERT `encoder.layer.N.`
BLOCK = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")
_EMBED = re.compile(r"(embed_tokens|wte|wpe|embed_positions|word_embeddings|position_embeddings)")


def block_index(name: str) -> int | None:
    m = BLOCK.search(name)
    return int(m.group(1)) if m else None


def num_blocks(model: torch.nn.Module) -> int:
    return 1 + max((i for n, _ in model.named_parameters() if (i := block_index(n)) is not None), default=-1)


def layer_decay_groups(groups: list[dict[str, Any]], model: torch.nn.Module, decay: float) -> list[dict[str, Any]]:
    """Split each group by depth and scale its lr by decay^(depth from the top)."""
    n = num_blocks(model)
    if n == 0:
        raise UserError("train.layer_lr_decay: this model has no numbered blocks ('.layers.N.', '.h.N.') to decay over")
    names = {id(p): name for name, p in model.named_parameters()}
    out: list[dict[str, Any]] = []
    for g in groups:
        by_depth: dict[int, list[torch.nn.Parameter]] = {}
        for p in g["params"]:
            name = names.get(id(p), "")
            i = block_index(name)
            depth = n - 1 - i if i is not None else (n if _EMBED.search(name) else 0)
            by_depth.setdefault(depth, []).append(p)
        for depth in sorted(by_depth):
            out.append({**g, "params": by_depth[depth], "lr": g["lr"] * decay**depth})
    return out


def reinit_top_layers(model: torch.nn.Module, k: int) -> list[str]:
    """Re-initialise the top k blocks in place (seeded by the caller's RNG); returns the parameter names."""
    n = num_blocks(model)
    if k > n:
        raise UserError(f"train.reinit_top_layers={k}: the model has only {n} blocks")
    std = float(getattr(getattr(model, "config", None), "initializer_range", None) or 0.02)
    names = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            i = block_index(name)
            if i is None or i < n - k:
                continue
            names.append(name)
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # norm gains
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
    return names


def check_reinit_trains(model: torch.nn.Module, names: list[str], method: str) -> None:
    frozen = [n for n, p in model.named_parameters() if p.requires_grad is False and _base_name(n) in set(names)]
    if frozen:
        raise UserError(f"train.reinit_top_layers: method '{method}' does not train the re-initialised weights "
                        f"(e.g. {frozen[0]}), so they would stay random; use method full or freeze over those layers")


def _base_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")
