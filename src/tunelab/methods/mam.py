"""MAM ("Mix-And-Match") adapter: prefix tuning on attention plus a scaled parallel adapter on the FFN.

Paper: He, Zhou, Ma, Berg-Kirkpatrick, Neubig, "Towards a Unified View of Parameter-Efficient Transfer
Learning", ICLR 2022, arXiv 2110.04366 (the MAM adapter is its best combination).

Maths:
- prefix tuning (Li & Liang 2021, arXiv 2101.00190): every attention layer also attends to l learned key/value vectors
  P_k, P_v in R^{l x (kv heads * head dim)}, i.e. a head-level parallel attention adapter with a softmax gate;
- FFN: h <- h + s * f(x), f(x) = relu(x W_down + b_down) W_up + b_up, x the FFN's input (module in `_bottleneck`).
Trainable: l * L * 2 * (kv heads * head dim) for the prefix (L blocks), plus L * (2 d r + r + d) for the adapters.

Defaults from the paper / the authors' scripts: prefix length l = 30, s = 4, relu, LoRA-style init (W_down
kaiming-uniform, W_up = 0), no LayerNorm in the adapter. Deviations / our choices:
- Bottleneck: the paper uses r = 512 on BART-large (d = 1024); we keep that ratio as reduction_factor 2
  (r = d // 2), so the size follows the model (the adapters library's `ParBnConfig` uses the same factor).
  `bottleneck` sets r directly.
- The prefix is peft's `PrefixTuningConfig` through `peft.get_peft_model`; the FFN adapters hook the underlying
  transformers model. peft trains P_k, P_v directly by default; the paper reparametrises them through an MLP
  (hidden 800): `prefix_projection: 800` gives that (peft's two-layer tanh MLP), at the cost of more parameters.
- Decoder-only models: the prefix sits in every self-attention layer (the paper's BART also has cross-attention).
  peft starts the real tokens' positions after the prefix (position l onwards), as it does for prefix tuning.
- Not identity at init (the random prefix is attended to from the start). Rows cannot be packed (the prefix
  is per row), and the generation backend avoids its cache-splicing path (`virtual_tokens`).
- Generation: peft 0.21's prefix injection in `generate` reads the cache under the name `past_key_values`, which
  transformers 5 renamed to `cache`; unpatched, `generate` silently decodes the base model. `tunelab.methods._peft_common.name_cache_for_peft`
  renames it for peft and back for the model (checked against a plain greedy loop in the unit test).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field

from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._adapters import (
    TunelabMethod,
    adapters_disabled,
    decoder_blocks,
    freeze_all,
    hidden_size,
)
from tunelab.methods._bottleneck import (
    Activation,
    BottleneckFields,
    Placement,
    adapters_trainable,
    add_adapters,
)
from tunelab.methods._peft_common import name_cache_for_peft

FFN_ADAPTER = Placement(("ffn",), "parallel")


class MAMConfig(BottleneckFields):
    name: Literal["mam"] = "mam"
    prefix_length: int = Field(30, gt=0, description="prefix (virtual key/value) length l per attention layer")
    prefix_projection: int | None = Field(
        None, gt=0, description="hidden size of an MLP reparametrising the prefix (the paper: 800); null: train it directly"
    )
    reduction_factor: int = Field(2, gt=0, description="FFN adapter bottleneck r = hidden_size // reduction_factor")
    activation: Activation = Field("relu", description="the FFN adapter's non-linearity")
    scaling: float = Field(4.0, description="s in h <- h + s * f(x) on the FFN")
    down_init: Literal["normal", "kaiming"] = Field("kaiming", description="W_down init: kaiming-uniform (LoRA-style) or N(0, init_std^2)")


def prefix_width(config: Any, d: int) -> int:
    """Numbers per token, layer and key-or-value of the prefix: kv heads x head dim (d, the hidden size, for a
    config without a key/value head count, e.g. GPT-2)."""
    kv_heads = getattr(config, "num_key_value_heads", None)
    if not kv_heads:
        return d
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    return kv_heads * head_dim


def prefix_params(width: int, layers: int, length: int, projection: int | None) -> int:
    """Prefix parameters: l x L x 2 x width directly; with the MLP, an l x width embedding, then
    width -> projection (tanh) -> L x 2 x width, with biases."""
    out = layers * 2 * width
    if projection is None:
        return length * out
    return length * width + width * projection + projection + projection * out + out


@METHODS.register("mam")
class MAM(TunelabMethod):
    Config = MAMConfig
    identity_at_init = False
    supports_packing = False

    @property
    def virtual_tokens(self) -> int:  # type: ignore[override]
        return self.cfg.prefix_length  # type: ignore[attr-defined]

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import PrefixTuningConfig, get_peft_model

        cfg: MAMConfig = self.cfg  # type: ignore[assignment]
        shapes = model.config.to_dict()  # type: ignore[operator]
        if shapes.get("global_head_dim") or shapes.get("per_layer_config"):
            raise NotImplementedError(
                "mam: this model's attention layers differ in key/value shape; peft sizes the prefix for the largest "
                "and skips the others, so the prefix would not reach every layer"
            )
        freeze_all(model)
        pcfg = PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=cfg.prefix_length, prefix_projection=cfg.prefix_projection is not None,
            encoder_hidden_size=cfg.prefix_projection,
        )
        try:
            tuned = get_peft_model(model, pcfg)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise UserError(f"method 'mam': peft's prefix tuning does not apply to this model: {str(e).splitlines()[0]}") from None
        add_adapters(tuned.get_base_model(), cfg, FFN_ADAPTER)
        name_cache_for_peft(tuned)
        return tuned

    def expected_trainable(self, model: torch.nn.Module) -> int:
        cfg: MAMConfig = self.cfg  # type: ignore[assignment]
        base = model.get_base_model()  # type: ignore[operator]
        width = prefix_width(base.config, hidden_size(base))
        prefix = prefix_params(width, len(decoder_blocks(base)), cfg.prefix_length, cfg.prefix_projection)
        return prefix + adapters_trainable(base, cfg, FFN_ADAPTER)

    @contextmanager
    def disabled(self, model: torch.nn.Module) -> Iterator[None]:
        with model.disable_adapter(), adapters_disabled(model):  # type: ignore[operator]
            yield
