"""Bottleneck adapters (houlsby, pfeiffer, parallel_adapter): the module's maths by hand, where the adapters sit
and what they read, and the trainable counts computed by hand for the tiny Llama (d = 64, 2 blocks)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._adapters import adapters_disabled
from tunelab.methods._base import count_params
from tunelab.methods._bottleneck import Bottleneck


def method(name: str, **fields: Any) -> Any:
    cls = METHODS.get(name)
    return cls(cls.Config.model_validate({"name": name, **fields}))


def filled(adapter: Bottleneck, seed: int) -> Bottleneck:
    """Every adapter weight random (W_up too), so f is far from zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return adapter


def by_hand(x: torch.Tensor, a: Bottleneck, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """f(x) = act(x W_down + b_down) W_up + b_up, written with explicit matrix products (Linear stores W^T)."""
    w_down, b_down = a.down.weight.detach().T, a.down.bias.detach()
    w_up, b_up = a.up.weight.detach().T, a.up.bias.detach()
    return act(x @ w_down + b_down) @ w_up + b_up


@pytest.mark.parametrize(
    ("activation", "act"),
    [("relu", lambda z: z.clamp(min=0)), ("swish", lambda z: z / (1 + torch.exp(-z))), ("identity", lambda z: z)],
)
def test_module_is_the_formula(activation: str, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
    a = filled(Bottleneck(6, 3, activation, 2.5, "kaiming", "zero", 1e-2), 0)  # type: ignore[arg-type]
    assert tuple(a.down.weight.shape) == (3, 6) and tuple(a.up.weight.shape) == (6, 3)
    x, h = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    with torch.no_grad():
        assert torch.allclose(a.delta(x), 2.5 * by_hand(x, a, act), atol=1e-6)
        assert torch.allclose(a.combine(h, x), h + 2.5 * by_hand(x, a, act), atol=1e-6)


def test_gated_composition_is_the_formula() -> None:
    a = filled(Bottleneck(6, 3, "relu", 1.5, "kaiming", "zero", 1e-2, gate_init=-4.0), 1)  # type: ignore[arg-type]
    x, h = torch.randn(3, 6), torch.randn(3, 6)
    g = 1 / (1 + math.exp(-float(a.gate.detach())))  # type: ignore[union-attr]
    with torch.no_grad():
        assert torch.allclose(a.combine(h, x), (1 - g) * h + g * 1.5 * by_hand(x, a, torch.relu), atol=1e-6)


def test_inits() -> None:
    torch.manual_seed(0)
    a = Bottleneck(64, 16, "relu", 1.0, "kaiming", "zero", 1e-2)  # type: ignore[arg-type]
    assert not a.up.weight.any() and not a.up.bias.any() and not a.down.bias.any()
    bound = 1 / math.sqrt(64)  # kaiming-uniform with a = sqrt(5), as nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert a.down.weight.abs().max() <= bound and a.down.weight.abs().max() > 0.8 * bound
    b = Bottleneck(64, 16, "relu", 1.0, "normal", "normal", 1e-2)  # type: ignore[arg-type]
    assert 0.007 < float(b.down.weight.detach().std()) < 0.013 and 0.007 < float(b.up.weight.detach().std()) < 0.013


def captured(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Input and (final, after every earlier hook) output of `module` on the next forward."""
    seen: dict[str, torch.Tensor] = {}

    def pre(m: Any, args: tuple, kwargs: dict) -> None:
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).detach()

    def post(m: Any, args: tuple, kwargs: dict, out: Any) -> None:
        seen["out"] = (out[0] if isinstance(out, tuple) else out).detach()

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True)
    return seen


def run(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


def test_houlsby_attention_adapter_modifies_the_attention_output(make_model: Callable, sft_batch: dict) -> None:
    model = method("houlsby").tune(make_model())
    block = model.model.layers[0]
    attn, mlp = block.self_attn, block.mlp
    assert isinstance(attn.tunelab_bottleneck, Bottleneck) and isinstance(mlp.tunelab_bottleneck, Bottleneck)
    at, ff = captured(attn), captured(mlp)
    run(model, sft_batch)
    base_attn, base_mlp_in = at["out"], ff["in"]  # all W_up = 0: the base model's values
    filled(attn.tunelab_bottleneck, 2)  # only the attention adapter of block 0 is non-zero
    run(model, sft_batch)
    # sequential: the attention output o becomes o + f(o), swish, s = 1
    assert torch.allclose(at["out"], base_attn + by_hand(base_attn, attn.tunelab_bottleneck, torch.nn.functional.silu), atol=1e-5)
    assert not torch.allclose(ff["in"], base_mlp_in, atol=1e-4), "the FFN input did not see the attention adapter"


def test_pfeiffer_has_one_adapter_per_block_after_the_ffn(make_model: Callable) -> None:
    model = method("pfeiffer").tune(make_model())
    for block in model.model.layers:
        assert isinstance(block.mlp.tunelab_bottleneck, Bottleneck)
        assert block.mlp.tunelab_bottleneck.activation == "relu"
        assert not hasattr(block.self_attn, "tunelab_bottleneck")


@pytest.mark.parametrize("insertion", ["parallel", "sequential"])
def test_parallel_reads_the_ffn_input_and_sequential_its_output(insertion: str, make_model: Callable, sft_batch: dict) -> None:
    model = method("parallel_adapter", insertion=insertion).tune(make_model())
    mlp = model.model.layers[1].mlp
    adapter = filled(mlp.tunelab_bottleneck, 3)
    seen = captured(mlp)
    run(model, sft_batch)
    x, y = seen["in"], seen["out"]
    with torch.no_grad(), adapters_disabled(model):
        y0 = mlp(x)  # the FFN alone
    f_in, f_out = (by_hand(v, adapter, torch.relu) for v in (x, y0))
    want = y0 + 4.0 * (f_in if insertion == "parallel" else f_out)
    other = y0 + 4.0 * (f_out if insertion == "parallel" else f_in)
    assert torch.allclose(y, want, atol=1e-5)
    assert not torch.allclose(y, other, atol=1e-3), "parallel and sequential gave the same output"


def test_attention_placement_of_the_parallel_adapter(make_model: Callable) -> None:
    model = method("parallel_adapter", sublayer="attn").tune(make_model())
    assert all(hasattr(b.self_attn, "tunelab_bottleneck") and not hasattr(b.mlp, "tunelab_bottleneck") for b in model.model.layers)


# d = 64, 2 blocks. Per adapter 2 d r + r + d (+ 1 gate):
#   r = 64 // 16 = 4: 2*64*4 + 4 + 64 = 580;  r = 8: 2*64*8 + 8 + 64 = 1096
HAND_COUNTS = [
    ("houlsby", {}, 2 * 2 * 580),
    ("pfeiffer", {}, 2 * 580),
    ("parallel_adapter", {}, 2 * 580),
    ("parallel_adapter", {"sublayer": "both", "composition": "gated"}, 2 * 2 * 581),
    ("houlsby", {"bottleneck": 8}, 2 * 2 * 1096),
    ("pfeiffer", {"reduction_factor": 8}, 2 * 1096),
]


@pytest.mark.parametrize(("name", "fields", "count"), HAND_COUNTS)
def test_trainable_counts_by_hand(name: str, fields: dict, count: int, make_model: Callable) -> None:
    m = method(name, **fields)
    model = m.tune(make_model())
    assert m.expected_trainable(model) == count
    assert count_params(model)[0] == count


def test_identity_at_init_flag_follows_the_init_and_composition() -> None:
    assert method("houlsby").identity_at_init and method("parallel_adapter").identity_at_init
    assert not method("houlsby", up_init="normal").identity_at_init
    assert not method("parallel_adapter", composition="gated").identity_at_init


def test_user_errors(make_model: Callable) -> None:
    with pytest.raises(UserError, match="method.reduction_factor"):
        method("pfeiffer", reduction_factor=128).tune(make_model())
    with pytest.raises(UserError, match="method.gate_init"):
        method("parallel_adapter", gate_init=-2.0)
    with pytest.raises(UserError, match="applied twice"):
        m = method("pfeiffer")
        m.tune(m.tune(make_model()))
