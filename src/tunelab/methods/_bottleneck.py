"""Bottleneck adapters, shared by `houlsby`, `pfeiffer`, `parallel_adapter` and `mam`.

The adapter (Houlsby et al., 2019, arXiv 1902.00751) is a two-layer bottleneck

    f(x) = act(x W_down + b_down) W_up + b_up,    W_down in R^{d x r}, W_up in R^{r x d},  r = d // reduction_factor

placed on a sub-layer (attention or feed-forward) of every transformer block. He et al. (2022, arXiv 2110.04366,
"Towards a Unified View of Parameter-Efficient Transfer Learning") describe every such method by four design
dimensions, all of which are choices here:
- functional form: `activation`;
- modified representation: the attention output and/or the FFN output (`Placement.parts`);
- insertion: sequential, x = h (the sub-layer's output), or parallel, x = the sub-layer's input;
- composition: scaled add h <- h + s * f(x), or gated h <- (1 - g) h + g * s * f(x) with one learned scalar gate
  g = sigmoid(theta) per adapter (s = 1 gives the unified view's plain gated form).

Initialisation: b_down = b_up = 0; W_down ~ N(0, init_std^2) ("normal", Houlsby's near-identity init) or
kaiming-uniform as nn.Linear / LoRA A ("kaiming", He et al.'s "lora" option); W_up = 0 by default (our choice for
every method: the tuned model is exactly the base at init, as LoRA's B = 0), N(0, init_std^2) with
`up_init: normal` (Houlsby's near-identity init, not an exact identity).

Ours, for all four methods: no LayerNorm inside the adapter (He et al.'s MAM has none either) and the base
model's own LayerNorms stay frozen (Houlsby et al. also train them); no adapter dropout; adapter weights are fp32
on the sub-layer's device (`attach`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tunelab.errors import UserError
from tunelab.methods._adapters import (
    ACTIVATIONS,
    AdapterModule,
    TunelabMethod,
    attach,
    block_part,
    decoder_blocks,
    freeze_all,
    hidden_size,
    linear_init_,
)

Activation = Literal["relu", "gelu", "swish", "silu", "tanh", "identity"]
KIND = "bottleneck"


class Bottleneck(AdapterModule):
    """f(x) = act(x W_down + b_down) W_up + b_up, composed with the sub-layer output as scaled add or gate."""

    def __init__(
        self,
        d: int,
        r: int,
        activation: Activation,
        scaling: float,
        down_init: Literal["normal", "kaiming"],
        up_init: Literal["zero", "normal"],
        init_std: float,
        gate_init: float | None = None,
    ) -> None:
        super().__init__()
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)
        self.activation = activation
        self.scaling = scaling
        linear_init_(self.down, down_init, init_std)
        linear_init_(self.up, up_init, init_std)
        self.gate = None if gate_init is None else nn.Parameter(torch.tensor(float(gate_init)))

    def f(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(ACTIVATIONS[self.activation](self.down(x)))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.f(x)

    def combine(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return super().combine(h, x)
        g = torch.sigmoid(self.gate)
        return ((1 - g) * h.to(g.dtype) + g * self.delta(x)).to(h.dtype)


def adapter_params(d: int, r: int, gated: bool) -> int:
    """Trainable numbers of one adapter: W_down, b_down, W_up, b_up (and the gate)."""
    return d * r + r + r * d + d + (1 if gated else 0)


class BottleneckFields(BaseModel):
    """Config fields every bottleneck method has; each method's Config subclasses it and sets its defaults."""

    model_config = ConfigDict(extra="forbid")
    reduction_factor: int = Field(16, gt=0, description="bottleneck size r = hidden_size // reduction_factor")
    bottleneck: int | None = Field(None, gt=0, description="bottleneck size r; overrides reduction_factor when set")
    activation: Activation = Field("relu", description="the adapter's non-linearity")
    scaling: float = Field(1.0, description="s in h <- h + s * f(x)")
    down_init: Literal["normal", "kaiming"] = Field(
        "normal", description="W_down init: N(0, init_std^2) (Houlsby) or kaiming-uniform (He et al.'s LoRA-style init)"
    )
    up_init: Literal["zero", "normal"] = Field(
        "zero", description="W_up init: zero (the tuned model starts as the base) or N(0, init_std^2)"
    )
    init_std: float = Field(1e-2, gt=0, description="std of the normal inits")


@dataclass(frozen=True)
class Placement:
    """Where a method puts its adapters: which sub-layers of every block, and in which insertion form."""

    parts: tuple[Literal["attn", "ffn"], ...]
    insertion: Literal["sequential", "parallel"]
    gate_init: float | None = None  # a gate logit: gated composition; None: scaled add


def bottleneck_size(cfg: BottleneckFields, d: int) -> int:
    r = cfg.bottleneck if cfg.bottleneck is not None else d // cfg.reduction_factor
    if r < 1:
        raise UserError(f"method.reduction_factor: {cfg.reduction_factor} leaves no bottleneck for hidden size {d}; "
                        "use a smaller factor or set method.bottleneck")
    return r


def add_adapters(model: nn.Module, cfg: BottleneckFields, where: Placement) -> None:
    """Attach one fresh bottleneck adapter to each placed sub-layer of every block (the base stays as is)."""
    d = hidden_size(model)
    r = bottleneck_size(cfg, d)
    for block in decoder_blocks(model):
        for part in where.parts:
            _, sub = block_part(block, part)
            adapter = Bottleneck(d, r, cfg.activation, cfg.scaling, cfg.down_init, cfg.up_init, cfg.init_std, where.gate_init)
            attach(sub, KIND, adapter, where.insertion)


def adapters_trainable(model: nn.Module, cfg: BottleneckFields, where: Placement) -> int:
    """(blocks) x (placed sub-layers per block) x (2 d r + r + d [+ 1 gate])."""
    d = hidden_size(model)
    return len(decoder_blocks(model)) * len(where.parts) * adapter_params(d, bottleneck_size(cfg, d), where.gate_init is not None)


class BottleneckMethod(TunelabMethod):
    """A method that is only bottleneck adapters: its subclass says where (`placement`)."""

    def placement(self) -> Placement:
        raise NotImplementedError

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        # W_up = b_up = 0 makes f = 0; a gate still rescales h by (1 - g) at init
        return self.cfg.up_init == "zero" and self.placement().gate_init is None  # type: ignore[attr-defined]

    def apply(self, model: nn.Module) -> nn.Module:
        freeze_all(model)
        add_adapters(model, self.cfg, self.placement())  # type: ignore[arg-type]
        return model

    def expected_trainable(self, model: nn.Module) -> int:
        return adapters_trainable(model, self.cfg, self.placement())  # type: ignore[arg-type]
