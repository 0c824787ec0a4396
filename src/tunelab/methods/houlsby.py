"""Houlsby adapters: a sequential bottleneck adapter after the attention output and after the FFN of every block.

Paper: Houlsby, Giurgiu, Jastrzebski, Morrone, de Laroussilhe, Gesmundo, Attariyan, Gelly, "Parameter-Efficient
Transfer Learning for NLP", ICML 2019, arXiv 1902.00751.

Maths (module in `_bottleneck`): f(h) = act(h W_down + b_down) W_up + b_up with r = d // reduction_factor, and
h <- h + s * f(h) on the attention sub-layer's output (after its output projection) and on the FFN's output, both
before the block's residual add. Trainable: 2 adapters per block, each 2 d r + r + d.

Defaults from the adapters library's Houlsby config (`DoubleSeqBnConfig`): reduction_factor 16, swish; s = 1.
Deviations / our choices:
- W_up = 0 at init (exact identity); the paper draws every adapter weight from N(0, 1e-2^2) (near-identity):
  `up_init: normal` gives that (without the paper's truncation at 2 std).
- The paper also trains the LayerNorms; here only the adapters train (as in the adapters library's config).
- No LayerNorm or dropout inside the adapter; the placement is fixed (use `parallel_adapter` to vary it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunelab.methods import METHODS
from tunelab.methods._bottleneck import Activation, BottleneckFields, BottleneckMethod, Placement


class HoulsbyConfig(BottleneckFields):
    name: Literal["houlsby"] = "houlsby"
    activation: Activation = Field("swish", description="the adapter's non-linearity")


@METHODS.register("houlsby")
class Houlsby(BottleneckMethod):
    Config = HoulsbyConfig

    def placement(self) -> Placement:
        return Placement(("attn", "ffn"), "sequential")
