"""Optimizer groups (no decay on biases/norms/embeddings) and the warmup + linear/cosine/constant schedule."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tunelab.config import TrainConfig
from tunelab.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def test_param_groups_split_decay(model: Any) -> None:
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    groups = param_groups(model, lr=0.1, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert all(g["lr"] == 0.1 for g in groups)
    assert "model.embed_tokens.weight" in no_decay
    assert all("layernorm" in n or "norm" in n or "embed" in n for n in no_decay)
    assert all(p.ndim == 2 for g in groups[:1] for p in g["params"])
    assert "model.layers.1.mlp.down_proj.weight" in decay
    assert "model.layers.0.self_attn.q_proj.weight" not in decay | no_decay  # frozen params are left out
    assert len(decay) + len(no_decay) == sum(p.requires_grad for p in model.parameters())


def test_param_groups_drop_empty_group() -> None:
    lin = torch.nn.Linear(3, 3, bias=False)
    groups = param_groups(lin, 0.1, 0.0)
    assert len(groups) == 1 and groups[0]["params"] == [lin.weight]


def test_optimizer_uses_config() -> None:
    lin = torch.nn.Linear(3, 3)
    opt = build_optimizer(param_groups(lin, 0.5, 0.1), TrainConfig(lr=0.5, adam_betas=(0.8, 0.9)))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["lr"] == 0.5


def test_lr_factor_values() -> None:
    # warmup 4 steps: linear ramp to (but not reaching) 1
    assert [lr_factor(s, 20, 4, "linear") for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert lr_factor(4, 20, 4, "linear") == 1.0
    assert lr_factor(12, 20, 4, "linear") == pytest.approx(0.5)
    assert lr_factor(20, 20, 4, "linear") == 0.0
    assert lr_factor(12, 20, 4, "cosine") == pytest.approx(0.5)
    assert lr_factor(8, 20, 4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(25, 20, 4, "cosine") == pytest.approx(0.0)
    assert lr_factor(19, 20, 4, "constant") == 1.0
    assert lr_factor(0, 10, 0, "cosine") == 1.0


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_scheduler_follows_lr_factor(kind: str) -> None:
    lin = torch.nn.Linear(2, 2)
    tc = TrainConfig(lr=0.3, scheduler=kind, warmup_ratio=0.2)
    opt = build_optimizer(param_groups(lin, tc.lr, 0.0), tc)
    sched = build_scheduler(opt, tc, total_steps=10)
    seen = []
    for _ in range(10):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.3 * lr_factor(s, 10, 2, kind) for s in range(10)])
    assert seen[0] == pytest.approx(0.1)  # warmup starts low, not at 0 (a zero first step would waste data)
    if kind != "constant":
        assert seen[-1] < seen[2]
