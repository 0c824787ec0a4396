"""Pfeiffer adapters: one sequential bottleneck adapter after the FFN of every block.

Paper: Pfeiffer, Kamath, Rücklé, Cho, Gurevych, "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning", EACL 2021, arXiv 2005.00247 (the single-adapter placement proposed there).

Maths (module in `_bottleneck`): f(h) = act(h W_down + b_down) W_up + b_up with r = d // reduction_factor, and
h <- h + s * f(h) on the FFN sub-layer's output. Trainable: 1 adapter per block, 2 d r + r + d.

Defaults from the adapters library's Pfeiffer config (`SeqBnConfig`): reduction_factor 16, relu; s = 1.
Deviations / our choices:
- Placement: on the FFN output before the block's residual add (as Houlsby's FFN adapter). Pfeiffer et al.'s
  adapter sits after the FFN's residual add and reuses the block's LayerNorm around it; pre-norm decoders
  (Llama, Qwen2, GPT-2) have no post-FFN LayerNorm, so the FFN output is the equivalent place.
- W_up = 0 at init (exact identity); `up_init: normal` gives a near-identity N(0, init_std^2) init instead.
- No LayerNorm or dropout inside the adapter; base LayerNorms stay frozen.
"""

from __future__ import annotations

from typing import Literal

from tunelab.methods import METHODS
from tunelab.methods._bottleneck import BottleneckFields, BottleneckMethod, Placement


class PfeifferConfig(BottleneckFields):
    name: Literal["pfeiffer"] = "pfeiffer"


@METHODS.register("pfeiffer")
class Pfeiffer(BottleneckMethod):
    Config = PfeifferConfig

    def placement(self) -> Placement:
        return Placement(("ffn",), "sequential")
