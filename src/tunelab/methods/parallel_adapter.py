"""He et al.'s scaled parallel adapter, with the unified view's design dimensions as settings.

Paper: He, Zhou, Ma, Berg-Kirkpatrick, Neubig, "Towards a Unified View of Parameter-Efficient Transfer
Learning", ICLR 2022, arXiv 2110.04366.

Maths (module in `_bottleneck`): f(x) = act(x W_down + b_down) W_up + b_up, r = d // reduction_factor;
  parallel:   h <- h + s * f(x), x the sub-layer's INPUT, h its output (before the block's residual add);
  sequential: the same with x = h;
  gated:      h <- (1 - g) h + g * s * f(x), g = sigmoid(theta), one learned scalar theta per adapter.
Trainable: (blocks) x (1 or 2 sub-layers) x (2 d r + r + d [+ 1 gate]).

Defaults: the paper's best form, a parallel adapter on the FFN with scaled add s = 4, relu, LoRA-style init
(W_down kaiming-uniform, W_up = 0, zero biases), as in the authors' code (`ffn_option=parallel`,
`ffn_adapter_scalar=4`, `ffn_adapter_init_option=lora`). Our choices:
- reduction_factor 16 (the adapters library's `ParBnConfig` uses 2; the paper sweeps the bottleneck size, up to
  512 of BART-large's 1024 in MAM): a budget of ~1/8 of the base's FFN parameters by default.
- The gated composition's gate is a learned scalar per adapter, initialised to theta = gate_init (default -4, sigmoid(-4) ~
  0.018, so near the base at init but not identical). The paper's gate for prefix tuning is data-dependent;
  a learned scalar is our simplification of its "gated add" ablation.
- No LayerNorm or dropout inside the adapter; base LayerNorms stay frozen.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._bottleneck import BottleneckFields, BottleneckMethod, Placement

DEFAULT_GATE = -4.0  # sigmoid(-4) ~ 0.018: the sub-layer keeps ~98% of its output at init
_PARTS: dict[str, tuple[Literal["attn", "ffn"], ...]] = {"ffn": ("ffn",), "attn": ("attn",), "both": ("attn", "ffn")}


class ParallelAdapterConfig(BottleneckFields):
    name: Literal["parallel_adapter"] = "parallel_adapter"
    scaling: float = Field(4.0, description="s in h <- h + s * f(x)")
    down_init: Literal["normal", "kaiming"] = Field("kaiming", description="W_down init: kaiming-uniform (LoRA-style) or N(0, init_std^2)")
    sublayer: Literal["ffn", "attn", "both"] = Field("ffn", description="modified representation: FFN output, attention output, or both")
    insertion: Literal["parallel", "sequential"] = Field("parallel", description="adapter input: the sub-layer's input or its output")
    composition: Literal["add", "gated"] = Field("add", description="scaled add h + s f(x), or gated (1 - g) h + g s f(x)")
    gate_init: float | None = Field(
        None, description="initial gate logit theta, g = sigmoid(theta), composition gated only (null: -4, g ~ 0.018)"
    )

    @model_validator(mode="after")
    def _gate_needs_gating(self) -> ParallelAdapterConfig:
        if self.gate_init is not None and self.composition != "gated":
            raise UserError("method.gate_init only applies with method.composition: gated; set that or drop gate_init")
        return self


@METHODS.register("parallel_adapter")
class ParallelAdapter(BottleneckMethod):
    Config = ParallelAdapterConfig

    def placement(self) -> Placement:
        cfg: ParallelAdapterConfig = self.cfg  # type: ignore[assignment]
        gate = (DEFAULT_GATE if cfg.gate_init is None else cfg.gate_init) if cfg.composition == "gated" else None
        return Placement(_PARTS[cfg.sublayer], cfg.insertion, gate)
