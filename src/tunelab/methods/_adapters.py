"""Shared machinery for tunelab's in-house methods, so each method file holds only its own maths.

- Finding the architecture's parts: `decoder_blocks` (the transformer blocks, in order) and `block_part`
  (a block's attention or feed-forward sub-layer), by structure and common names, so a method works on
  Llama, Qwen2, Gemma, GPT-2... without per-architecture tables.
- Inserting modules without renaming the base model's parameters: an `AdapterModule` is attached as a child
  of the sub-layer it modifies (`<sublayer>.tunelab_<kind>`), and a forward hook applies it (sequentially
  to the sub-layer's output, or in parallel from its input). The base weights keep their names, so the base
  model's state dict, reference log-probs and `merged()` export need no renaming.
- Switching every adapter off at once (`adapters_disabled`), which gives a method its `disabled()` context.
- Saving and loading tunelab's own format (`save_tunelab` / `load_tunelab`): the trained tensors in one
  safetensors file plus the method config; the load rebuilds the structure with the method's `apply` and
  then requires every trained tensor to be present.
- `TunelabMethod`: the base class wiring the above, so an in-house method implements `apply` and the
  analytic `expected_trainable` parameter count only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tunelab.errors import UserError
from tunelab.methods._base import Method

PREFIX = "tunelab_"
_ATTN = re.compile(r"^(self_attn|attn|attention|self_attention)$")
_FFN = re.compile(r"^(mlp|ffn|feed_forward|block_sparse_moe)$")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks in order: the longest ModuleList whose items share one class."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            items = list(module)
            if items and all(type(m) is type(items[0]) for m in items):
                best = items
    if not best:
        raise UserError(f"{type(model).__name__}: no list of transformer blocks found, so this method cannot place its modules")
    return best


def block_part(block: nn.Module, part: Literal["attn", "ffn"]) -> tuple[str, nn.Module]:
    """(child name, module) of a block's attention or feed-forward sub-layer."""
    pattern = _ATTN if part == "attn" else _FFN
    for name, child in block.named_children():
        if pattern.match(name):
            return name, child
    names = [n for n, _ in block.named_children()]
    raise UserError(f"{type(block).__name__}: no {'attention' if part == 'attn' else 'feed-forward'} sub-layer among {names}")


def hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", None)
    if not isinstance(size, int):
        raise UserError(f"{type(model).__name__}: the model config has no hidden_size")
    return size


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


class AdapterModule(nn.Module):
    """Base of every module tunelab inserts; `active` False makes its hook a no-op (the base model)."""

    active: bool = True

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The modification added to the hidden state, from x (the sub-layer's output or input)."""
        raise NotImplementedError

    def combine(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The new hidden state from the sub-layer's output `h` and the adapter's input `x` (already in the
        adapter's dtype). Default: the additive form h + delta(x); a composition that also rescales h (a gate,
        (1 - g) h + g f(x)) overrides this."""
        return h + self.delta(x).to(h.dtype)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    x = kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        raise RuntimeError("a parallel adapter could not find its sub-layer's input hidden states")
    return x


def attach(sublayer: nn.Module, kind: str, adapter: AdapterModule, insertion: Literal["sequential", "parallel"]) -> None:
    """Register `adapter` as `sublayer.tunelab_<kind>` and apply it on every forward.

    sequential: h <- h + delta(h) on the sub-layer's output (Houlsby/Pfeiffer);
    parallel:   h <- h + delta(x) with x the sub-layer's input (He et al.'s parallel adapter).
    An adapter may replace the addition through `combine(h, x)` (a gated composition).
    A sub-layer that returns a tuple (attention: output, weights) is modified in its first element.
    """
    name = PREFIX + kind
    if hasattr(sublayer, name):
        raise UserError(f"{type(sublayer).__name__} already has a tunelab '{kind}' module; a method was applied twice")
    ref = next(sublayer.parameters(), None)
    # trainable adapter weights stay fp32 (as peft keeps LoRA weights) on the sub-layer's device
    adapter.to(device=ref.device if ref is not None else None)
    sublayer.add_module(name, adapter)
    dtype = next(adapter.parameters()).dtype

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not adapter.active:
            return output
        h = output[0] if isinstance(output, tuple) else output
        x = h if insertion == "sequential" else _hidden(args, kwargs)
        h = adapter.combine(h, x.to(dtype))
        return (h, *output[1:]) if isinstance(output, tuple) else h

    sublayer.register_forward_hook(hook, with_kwargs=True)


def tunelab_modules(model: nn.Module) -> list[AdapterModule]:
    return [m for m in model.modules() if isinstance(m, AdapterModule)]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    mods = tunelab_modules(model)
    before = [m.active for m in mods]
    for m in mods:
        m.active = False
    try:
        yield
    finally:
        for m, was in zip(mods, before, strict=True):
            m.active = was


def save_tunelab(model: nn.Module, path: Path, cfg: Any, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path / "tunelab_adapter.safetensors")
    (path / "tunelab_method.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))


def load_tunelab(model: nn.Module, path: Path, expected: set[str]) -> nn.Module:
    """Copy the saved tensors into `model` (already rebuilt by the method's `apply`); every name in
    `expected` must be saved and every saved name must exist."""
    from safetensors.torch import load_file

    file = path / "tunelab_adapter.safetensors"
    if not file.is_file():
        raise ValueError(f"{file} missing: this is not a tunelab-format run")
    state = load_file(file)
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    missing = sorted(expected - set(state))
    if unknown or missing:
        raise ValueError(f"{file} does not fit the model: unknown {unknown[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t.to(params[name].dtype))
    return model


class TunelabMethod(Method):
    """An in-house method: modules attached with `attach`, saved in tunelab's format, switchable off."""

    saved_format = "tunelab"
    mergeable = False
    can_disable = True

    def saved_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What RUN/final keeps: the trainable tensors (adapters, and base tensors the method trains)."""
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        with adapters_disabled(model):
            yield

    def save_final(self, model: nn.Module, path: Path) -> None:
        save_tunelab(model, path, self.cfg, self.saved_state(model))

    def load_final(self, base: nn.Module, path: Path) -> nn.Module:
        model = self.apply(base)
        return load_tunelab(model, path, set(self.saved_state(model)))


def linear_init_(layer: nn.Linear, how: Literal["zero", "kaiming", "normal"], std: float = 1e-2) -> None:
    with torch.no_grad():
        if how == "zero":
            layer.weight.zero_()
        elif how == "kaiming":
            nn.init.kaiming_uniform_(layer.weight, a=5**0.5)
        else:
            layer.weight.normal_(0.0, std)
        if layer.bias is not None:
            layer.bias.zero_()


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "swish": nn.functional.silu,
    "silu": nn.functional.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}
