"""Per-sample attention for packed rows, without a (rows, 1, T, T) mask.

A packed row holds several samples one after another, with `position_ids` restarting at 0 for each. By default
transformers turns that into a dense block-diagonal causal mask over the whole row and runs SDPA with it: memory
and time quadratic in the row length, and SDPA's fused CPU kernel cannot skip the masked blocks. Here each sample
(segment) runs SDPA on its own with `is_causal=True`, so the work is the sum of the squares of the sample lengths
and no mask tensor exists. Measured on SmolLM2-135M, LoRA, packed 2048-token MBPP rows, 2 CPU threads: +26-37%
training tokens/s with identical losses (benchmarks/profile_train_step.py).

Registered with transformers as the attention implementation `tunelab_packed`. Whenever a call is not a packed
row (a padding mask is given, a KV cache makes queries and keys differ in length, no restart in position_ids) it
hands the call to transformers' own SDPA function unchanged, so the same model also evaluates and generates.
`enable_packed_attention` switches a model to it only after checking, on a two-sample row, that its logits equal
those of the model's default attention: an architecture that does not pass `position_ids` down to its attention
function keeps the default.

On GPUs, flash-attention's variable-length kernels do the same job (`model.attn_implementation:
flash_attention_2`, when installed); the loop uses this implementation on CPU only.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

NAME = "tunelab_packed"
STATS = {"packed_calls": 0}  # per-segment calls so far: proof the path engages, not only that logits agree


def segment_bounds(position_ids: torch.Tensor) -> list[int]:
    """Start of every segment of one row (positions restart at 0), plus the row length."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [*starts, int(position_ids.shape[0])]


def packed_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: per-segment causal SDPA on packed rows, the stock SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    B, H, T, _ = query.shape
    packed = (attention_mask is None and position_ids is not None and key.shape[2] == T and T > 1
              and bool((position_ids[:, 1:] == 0).any()))
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    STATS["packed_calls"] += 1
    position_ids = position_ids.expand(B, -1)
    gqa = key.shape[1] != H
    p = dropout if module.training else 0.0
    rows = []
    for b in range(B):
        bounds = segment_bounds(position_ids[b])
        rows.append(torch.cat([
            F.scaled_dot_product_attention(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e],
                                           dropout_p=p, is_causal=True, scale=scaling, enable_gqa=gqa)
            for s, e in zip(bounds, bounds[1:], strict=False)
        ], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def packed_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No mask for packed rows (the attention function reads position_ids); the stock SDPA mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and kwargs.get("mask_function") is not None and _is_packed_remap(kwargs["mask_function"]):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def _closure(fn: Any) -> dict[str, Any]:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ()), strict=False))


def _named(fn: Any, prefix: str) -> bool:
    return getattr(fn, "__qualname__", "").startswith(prefix)


def _is_packed_remap(fn: Any) -> bool:
    """True for exactly transformers' mask of packed rows under plain causal attention: the causal mask remapped to
    per-sample positions (`remap_positions_for_packed_sequence`), and-ed with the same-sample mask
    (`packed_sequence_mask_function`). Any other mask (a sliding window, an overlay, padding, a prefix) takes the
    stock path. A transformers release that builds it differently is caught by `enable_packed_attention`."""
    from transformers.masking_utils import causal_mask_function

    def remapped_causal(f: Any) -> bool:
        return _named(f, "remap_positions_for_packed_sequence") and _closure(f).get("mask_function") is causal_mask_function

    if _named(fn, "and_masks"):
        parts = _closure(fn).get("mask_functions") or ()
        return (len(parts) == 2 and remapped_causal(parts[0])
                and _named(parts[1], "packed_sequence_mask_function"))
    return remapped_causal(fn)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, packed_mask)


@torch.no_grad()
def enable_packed_attention(model: Any, quiet: bool = True) -> bool:
    """Switch `model` to per-sample packed attention if it computes the same logits there; returns whether it did."""
    register()
    cfg = model.config
    current = getattr(cfg, "_attn_implementation", None)
    if current not in (None, "sdpa"):
        return False  # the user chose an implementation (eager, flash, ...): keep it
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []) or (
            getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)):
        return False  # per-segment causal attention has no window
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 12), generator=gen).to(device)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]], device=device)
    was = model.training
    model.eval()
    try:
        want = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        model.set_attn_implementation(NAME)
        calls = STATS["packed_calls"]
        got = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        engaged = STATS["packed_calls"] > calls  # else transformers built its dense mask and we would only pass it on
        same = torch.allclose(want.float(), got.float(), rtol=1e-3, atol=1e-4)
        if not (same and engaged):
            model.set_attn_implementation(current or "sdpa")
            if not quiet:
                why = "did not reproduce its logits" if engaged else "was not reached: this transformers builds the mask differently"
                print(f"note: {type(model).__name__} keeps its default attention for packed rows (per-sample attention "
                      f"{why})", file=sys.stderr)
        return same and engaged
    finally:
        model.train(was)


def default_attention(model: Any) -> None:
    """Back to transformers' SDPA if `model` (or the model under its peft wrapper) uses `tunelab_packed`."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if getattr(base.config, "_attn_implementation", None) == NAME:
        base.set_attn_implementation("sdpa")


def use_packed_attention(model: Any) -> None:
    """Switch to `tunelab_packed` without the check: another process ran `enable_packed_attention` on the same
    architecture and its check passed (a meta-device skeleton cannot run one)."""
    register()
    model.set_attn_implementation(NAME)
