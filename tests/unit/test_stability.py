"""Layer-wise lr decay and top-layer re-initialisation (train options usable with any method), by hand."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.models.presets import PRESETS
from tunelab.train.optim import param_groups
from tunelab.train.stability import block_index, check_reinit_trains, layer_decay_groups, reinit_top_layers


def method(name: str, **kw: Any) -> Any:
    cls = METHODS.get(name)
    return cls(cls.Config.model_validate({"name": name, **kw}))


def lr_of(groups: list[dict], model: torch.nn.Module) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr"] for g in groups for p in g["params"]}


def test_block_index_across_architectures() -> None:
    assert block_index("model.layers.3.mlp.up_proj.weight") == 3
    assert block_index("transformer.h.11.attn.c_attn.weight") == 11
    assert block_index("bert.encoder.layer.0.attention.self.query.bias") == 0
    assert block_index("model.embed_tokens.weight") is None


def test_layer_decay_scales_by_depth_from_the_top(make_model: Any) -> None:
    model = method("full").tune(make_model())  # 2 blocks
    lrs = lr_of(layer_decay_groups(param_groups(model, 1.0, 0.1), model, 0.5), model)
    assert lrs["model.layers.1.self_attn.q_proj.weight"] == 1.0  # top block: 0.5^0
    assert lrs["model.layers.0.self_attn.q_proj.weight"] == 0.5  # 0.5^1
    assert lrs["model.embed_tokens.weight"] == 0.25  # embeddings: 0.5^2
    assert lrs["model.norm.weight"] == 1.0  # above the blocks


def test_layer_decay_scales_a_methods_own_group_lrs(make_model: Any) -> None:
    model = method("lora", r=2).tune(make_model())
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 3.0, "weight_decay": 0.0}]
    lrs = lr_of(layer_decay_groups(groups, model, 0.1), model)
    top = next(v for k, v in lrs.items() if ".layers.1." in k)
    bottom = next(v for k, v in lrs.items() if ".layers.0." in k)
    assert top == 3.0 and bottom == pytest.approx(0.3)
    assert sum(len(g["params"]) for g in layer_decay_groups(groups, model, 0.1)) == len(groups[0]["params"])


def test_reinit_top_layers_changes_only_those_blocks() -> None:
    model = PRESETS["tiny-llama"].model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    names = reinit_top_layers(model, 1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert names and all(".layers.1." in n for n in names)
    assert changed <= set(names) and any("q_proj" in n for n in changed)
    assert torch.equal(dict(model.named_parameters())["model.layers.1.input_layernorm.weight"], torch.ones(64))
    std = dict(model.named_parameters())["model.layers.1.mlp.up_proj.weight"].std().item()
    assert std == pytest.approx(0.02, rel=0.1)  # the config's initializer_range


def test_reinit_needs_the_method_to_train_those_weights() -> None:
    model = PRESETS["tiny-llama"].model()
    names = reinit_top_layers(model, 1)
    check_reinit_trains(method("freeze", top_layers=1).tune(model), names, "freeze")
    model = PRESETS["tiny-llama"].model()
    names = reinit_top_layers(model, 1)
    with pytest.raises(UserError, match="stay random"):
        check_reinit_trains(method("lora", r=2).tune(model), names, "lora")
    with pytest.raises(UserError, match="only 2 blocks"):
        reinit_top_layers(PRESETS["tiny-llama"].model(), 3)
