"""Compacter / Compacter++: the PHM layer against explicit Kronecker products, the shared rule, parameter
counts computed by hand, placement, identity at init and gradient flow, and the can_disable switch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._base import count_params
from tunelab.methods._phm import CompacterAdapter, PHMLinear, bottleneck_size, new_rule, phm_layer_params


def make(name: str, **fields: Any) -> Any:
    cls = METHODS.get(name)
    return cls(cls.Config.model_validate({"name": name, **fields}))


def phm_modules(model: torch.nn.Module) -> list[PHMLinear]:
    return [m for m in model.modules() if isinstance(m, PHMLinear)]


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def randomise(layer: PHMLinear, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


# -- the PHM layer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("factorized", [True, False])
@pytest.mark.parametrize(("n", "d_in", "d_out", "rank"), [(4, 8, 12, 1), (2, 6, 4, 3), (3, 9, 3, 2)])
def test_phm_layer_equals_an_explicit_sum_of_kronecker_products(factorized: bool, n: int, d_in: int, d_out: int, rank: int) -> None:
    layer = PHMLinear(d_in, d_out, new_rule(n, 1.0), factorized=factorized, rank=rank)
    randomise(layer, 0)
    A = layer.rule.detach()
    if factorized:
        assert layer.s is not None and layer.t is not None
        B = [layer.s[i].detach() @ layer.t[i].detach().T for i in range(n)]
    else:
        assert layer.fast is not None
        B = [layer.fast[i].detach() for i in range(n)]
    W = sum(torch.kron(A[i], B[i]) for i in range(n))
    assert W.shape == (d_in, d_out)
    x = torch.randn(2, 5, d_in)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ W + layer.bias.detach(), rtol=1e-5, atol=1e-5)


def test_phm_layer_n1_is_a_plain_linear_layer_scaled_by_the_rule() -> None:
    layer = PHMLinear(3, 2, new_rule(1, 1.0), factorized=False)
    with torch.no_grad():
        layer.rule.fill_(2.0)
        assert layer.fast is not None
        layer.fast.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
        out = layer(torch.tensor([[1.0, 2.0, 3.0]]))
    assert out.tolist() == [[2 * (1 + 3) + 0.5, 2 * (2 + 3) - 0.5]]


def test_phm_dim_must_divide_the_sizes() -> None:
    with pytest.raises(UserError, match=r"method\.phm_dim"):
        PHMLinear(6, 4, new_rule(4, 1.0))


def test_up_projection_starts_at_zero_and_down_does_not() -> None:
    rule = new_rule(4, 1e-4)
    up, down = PHMLinear(8, 16, rule, zero_out=True), PHMLinear(16, 8, rule)
    assert torch.count_nonzero(up.weight()) == 0 and torch.count_nonzero(up.bias) == 0
    assert up.s is not None and torch.count_nonzero(up.s) == up.s.numel()  # only the output-side factor is zero
    assert torch.count_nonzero(down.weight()) > 0


def test_shared_rule_accumulates_the_gradients_of_every_layer() -> None:
    rule = new_rule(2, 1.0)
    a, b = PHMLinear(4, 6, rule), PHMLinear(6, 4, rule)
    assert a.rule is b.rule
    x, y = torch.randn(3, 4), torch.randn(3, 6)
    g_a = torch.autograd.grad(a(x).square().sum(), rule)[0]
    g_b = torch.autograd.grad(b(y).square().sum(), rule)[0]
    (a(x).square().sum() + b(y).square().sum()).backward()
    assert rule.grad is not None and g_a.abs().sum() > 0 and g_b.abs().sum() > 0
    assert not torch.allclose(g_a, g_b)
    torch.testing.assert_close(rule.grad, g_a + g_b)


# -- sizes -----------------------------------------------------------------------------------------------


def test_bottleneck_rounds_up_to_a_multiple_of_n() -> None:
    assert bottleneck_size(768, 32, 4) == 24  # T5-base, the paper's setting: unchanged
    assert bottleneck_size(896, 32, 4) == 28
    assert bottleneck_size(64, 32, 4) == 4  # 2 -> 4
    assert bottleneck_size(100, 10, 4) == 12  # 10 -> 12
    assert bottleneck_size(64, 128, 4) == 4  # 0 -> n


def test_phm_layer_param_formula_by_hand() -> None:
    assert phm_layer_params(64, 4, 4, 1, True) == 64 + 4 + 4
    assert phm_layer_params(4, 64, 4, 1, True) == 4 + 64 + 64
    assert phm_layer_params(64, 8, 4, 2, True) == 2 * 72 + 8
    assert phm_layer_params(64, 8, 4, 1, False) == 64 * 8 // 4 + 8
    layer = PHMLinear(64, 8, new_rule(4, 1.0), factorized=False)
    assert sum(p.numel() for n, p in layer.named_parameters() if n != "rule") == 136


# Tiny Llama: d = 64, 2 blocks, n = 4, bottleneck 64 // 32 = 2 rounded up to 4.
# Per adapter: down 1 * (64 + 4) + 4 = 72, up 1 * (4 + 64) + 64 = 132 -> 204. Shared rule 4^3 = 64.
# Norms: input_layernorm + post_attention_layernorm per block and the final norm, 5 x 64 = 320.
@pytest.mark.parametrize(("name", "fields", "count"), [
    ("compacter", {}, 4 * 204 + 64 + 320),
    ("compacter_pp", {}, 2 * 204 + 64 + 320),
    ("compacter", {"train_norms": False}, 4 * 204 + 64),
    ("compacter_pp", {"train_norms": False}, 2 * 204 + 64),
    ("compacter", {"train_norms": False, "shared_phm_rule": False}, 4 * 204 + 8 * 64),
    # rank 2, bottleneck 64 // 8 = 8: down 2 * 72 + 8 = 152, up 2 * 72 + 64 = 208
    ("compacter_pp", {"train_norms": False, "phm_rank": 2, "reduction_factor": 8}, 2 * 360 + 64),
    # full fast matrices, bottleneck 8: down 64 * 8 / 4 + 8 = 136, up 8 * 64 / 4 + 64 = 192
    ("compacter_pp", {"train_norms": False, "factorized_phm": False, "reduction_factor": 8}, 2 * 328 + 64),
])
def test_trainable_count_by_hand(name: str, fields: dict, count: int, make_model: Any) -> None:
    method = make(name, **fields)
    model = method.tune(make_model())
    assert count_params(model)[0] == count
    assert method.expected_trainable(model) == count


def test_phm_dim_not_dividing_the_hidden_size_is_a_user_error(make_model: Any) -> None:
    with pytest.raises(UserError, match=r"method\.phm_dim"):
        make("compacter", phm_dim=3).tune(make_model())


# -- structure -------------------------------------------------------------------------------------------


def test_one_rule_tensor_for_the_whole_model(make_model: Any) -> None:
    model = make("compacter").tune(make_model())
    layers = phm_modules(model)
    assert len(layers) == 8
    assert all(m.rule is layers[0].rule for m in layers)
    assert len({m.rule.data_ptr() for m in layers}) == 1
    assert sum(name.endswith(".rule") for name, _ in model.named_parameters()) == 1
    own = make("compacter", shared_phm_rule=False).tune(make_model())
    assert len({id(m.rule) for m in phm_modules(own)}) == 8


@pytest.mark.parametrize(("name", "parts"), [("compacter", ["self_attn", "mlp"]), ("compacter_pp", ["mlp"])])
def test_placement_after_attention_and_or_ffn(name: str, parts: list, make_model: Any, sft_batch: dict) -> None:
    """Setting one placed adapter's up bias to 1 moves exactly its sub-layer's output in block 0 by 1 (the
    sub-layers before it in block 0 see the base model's inputs and keep the base outputs)."""
    base = make_model()
    model = make(name).tune(make_model())
    held = [n for n, _ in model.named_modules() if n.endswith("tunelab_compacter")]
    assert held == [f"model.layers.{i}.{p}.tunelab_compacter" for i in range(2) for p in parts]

    def outputs(net: torch.nn.Module) -> dict[str, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}
        block = net.model.layers[0]  # type: ignore[union-attr,index]
        handles = []
        for part in ("self_attn", "mlp"):
            def keep(_m: Any, _a: Any, out: Any, part: str = part) -> None:
                got[part] = (out[0] if isinstance(out, tuple) else out).detach()
            handles.append(getattr(block, part).register_forward_hook(keep))
        logits(net, sft_batch)
        for h in handles:
            h.remove()
        return got

    want = outputs(base)
    for part in parts:
        adapter = getattr(model.model.layers[0], part).tunelab_compacter  # type: ignore[union-attr,index]
        with torch.no_grad():
            adapter.up.bias.fill_(1.0)
        got = outputs(model)
        torch.testing.assert_close(got[part] - want[part], torch.ones_like(want[part]))
        if part == "mlp":
            assert torch.equal(got["self_attn"], want["self_attn"])
        with torch.no_grad():
            adapter.up.bias.zero_()


# -- init, training, switching off ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["compacter", "compacter_pp"])
@pytest.mark.parametrize("fields", [{}, {"factorized_phm": False, "shared_phm_rule": False}])
def test_exact_identity_at_init(name: str, fields: dict, make_model: Any, sft_batch: dict) -> None:
    assert torch.equal(logits(make(name, **fields).tune(make_model()), sft_batch), logits(make_model(), sft_batch))


def test_gradients_reach_every_factor_within_two_steps(make_model: Any, sft_batch: dict) -> None:
    method = make("compacter", train_norms=False)
    model = method.tune(make_model())
    adapter = next(m for m in model.modules() if isinstance(m, CompacterAdapter))

    def step() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad(set_to_none=False)
        model(input_ids=sft_batch["input_ids"], attention_mask=sft_batch["attention_mask"], labels=sft_batch["labels"]).loss.backward()
        grads = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 1e-1 * p.grad.sign()  # sign step: the tiny 1e-4 rule must still move things
        return grads

    first = step()
    # zero up factor: only the up projection's own t and bias see a gradient in the first step
    assert {n for n, g in first.items() if g.abs().sum() > 0} == {"up.t", "up.bias"}
    second = step()
    assert all(second[n].abs().sum() > 0 for n in ("down.rule", "down.s", "down.t", "down.bias", "up.s", "up.t", "up.bias"))


def test_without_norm_training_the_adapters_switch_off(make_model: Any, sft_batch: dict) -> None:
    method = make("compacter_pp", train_norms=False)
    assert method.can_disable and not method.mergeable
    base = logits(make_model(), sft_batch)
    model = method.tune(make_model())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CompacterAdapter):
                m.up.bias.normal_()
    assert not torch.allclose(logits(model, sft_batch), base, atol=1e-4)
    with method.disabled(model):
        assert torch.equal(logits(model, sft_batch), base)
    assert not torch.allclose(logits(model, sft_batch), base, atol=1e-4)


def test_with_norm_training_it_cannot_switch_off_and_saves_the_norms(make_model: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    method = make("compacter")
    assert not method.can_disable
    model = method.tune(make_model())
    with pytest.raises(NotImplementedError, match="train_norms"), method.disabled(model):
        pass
    method.save_final(model, tmp_path)
    saved = load_file(tmp_path / "tunelab_adapter.safetensors")
    assert {"model.norm.weight", "model.layers.1.post_attention_layernorm.weight"} <= set(saved)
    assert sum(k.endswith(".rule") for k in saved) == 1
    assert {n for n in method.checkpoint_state(model) if "norm" in n} == {n for n in saved if "norm" in n}
