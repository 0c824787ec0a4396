"""HFT: the category-level half (2 of 4 attention matrices, the 2-of-3 / 1-of-3 FFN split, 1 of 2 norms), seeded
and redrawn per stage; the stage switch in `on_step` (requires_grad, optimizer state, no decay on frozen
tensors); counts by hand; and a two-stage run resumed from a stage-1 checkpoint equal to the uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from tunelab.config import TrainConfig, load_config
from tunelab.methods import METHODS
from tunelab.methods._base import count_params
from tunelab.methods.hft import draw_half, stage_of
from tunelab.models.presets import PRESETS
from tunelab.objectives import OBJECTIVES
from tunelab.train.optim import build_optimizer

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
# tiny Llama: hidden 64, 4 heads of 16, 2 kv heads, intermediate 128
SIZE = {"q_proj": 64 * 64, "k_proj": 32 * 64, "v_proj": 32 * 64, "o_proj": 64 * 64, "gate_proj": 128 * 64, "up_proj": 128 * 64,
        "down_proj": 64 * 128, "input_layernorm": 64, "post_attention_layernorm": 64}
EMBED = 49152 * 64


def hft(**fields: Any) -> Any:
    cls = METHODS.get("hft")
    return cls(cls.Config.model_validate({"name": "hft", **fields}))


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def picked(model: nn.Module, block: int, names: tuple[str, ...]) -> list[str]:
    """Which of the block's modules (by short name) have trainable weights."""
    on = trainable(model)
    return [m for m in names if any(n.startswith(f"model.layers.{block}.") and f".{m}." in n for n in on)]


# --------------------------------------------------------------------------------------------- pure functions


def test_draw_half_takes_half_of_every_category() -> None:
    counts = [{"attn": 4, "ffn": 3, "norm": 2}] * 4
    for seed in range(5):
        picks = draw_half(counts, seed)
        assert all(len(b["attn"]) == 2 and len(b["norm"]) == 1 for b in picks)
        assert sorted(len(b["ffn"]) for b in picks) == [1, 1, 2, 2]  # half the blocks 2 of 3, the others 1 of 3
        assert all(set(b["attn"]) <= {0, 1, 2, 3} and len(set(b["ffn"])) == len(b["ffn"]) for b in picks)


def test_draw_half_with_an_odd_number_of_blocks_stays_under_half() -> None:
    picks = draw_half([{"ffn": 3}] * 3, 0)
    assert sorted(len(b["ffn"]) for b in picks) == [1, 1, 2]  # 4 of 9: floor(3 / 2) blocks get the extra unit


def test_draw_half_is_seeded() -> None:
    counts = [{"attn": 4, "ffn": 3, "norm": 2}] * 8
    assert draw_half(counts, 3) == draw_half(counts, 3)
    assert draw_half(counts, 3) != draw_half(counts, 4)


def test_stage_of_splits_the_steps_evenly() -> None:
    assert [stage_of(s, 6, 2) for s in range(6)] == [0, 0, 0, 1, 1, 1]
    assert [stage_of(s, 7, 3) for s in range(7)] == [0, 0, 0, 1, 1, 2, 2]  # s * 3 // 7
    assert [stage_of(s, 5, 1) for s in range(5)] == [0] * 5
    assert stage_of(0, 2, 4) == 0 and stage_of(1, 2, 4) == 2  # more stages than steps: some are skipped


# --------------------------------------------------------------------------------------------- tiny models


def test_llama_selection_per_block_and_count_by_hand(make_model: Any) -> None:
    method = hft()
    model = method.tune(make_model())
    ffn = []
    for b in (0, 1):
        assert len(picked(model, b, ATTN)) == 2
        assert len(picked(model, b, NORMS)) == 1
        ffn.append(len(picked(model, b, FFN)))
    assert sorted(ffn) == [1, 2]
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= trainable(model)  # embeddings (= tied head) and final norm
    by_hand = EMBED + 64 + sum(SIZE[m] for b in (0, 1) for m in picked(model, b, ATTN + FFN + NORMS))
    assert count_params(model)[0] == method.expected_trainable(model) == by_hand


def test_embeddings_and_head_flags(make_model: Any) -> None:
    model = hft(train_embeddings=False, train_head=False).tune(make_model())
    assert not {"model.embed_tokens.weight", "model.norm.weight"} & trainable(model)
    model = hft(train_embeddings=False).tune(make_model())  # the head is tied to the embeddings: it trains
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= trainable(model)


def test_selection_is_reproducible_and_redrawn_per_stage(make_model: Any) -> None:
    a, b = hft(stages=2), hft(stages=2)
    ma, mb = a.tune(make_model()), b.tune(make_model())
    assert trainable(ma) == trainable(mb)
    assert a.selection(1) == b.selection(1) and a.selection(0) != a.selection(1)
    assert trainable(hft(seed=1).tune(make_model())) != trainable(ma)


def test_qwen2_biases_go_with_their_matrix() -> None:
    method = hft()
    model = method.tune(PRESETS["tiny-qwen2"].model(dtype=torch.float32))
    on = trainable(model)
    for b in (0, 1):
        assert len(picked(model, b, ATTN)) == 2
        for m in ("q_proj", "k_proj", "v_proj"):
            assert (f"model.layers.{b}.self_attn.{m}.weight" in on) == (f"model.layers.{b}.self_attn.{m}.bias" in on)
    assert count_params(model)[0] == method.expected_trainable(model)


def test_gpt2_trains_one_of_two_per_category() -> None:
    method = hft()
    model = method.tune(PRESETS["tiny-gpt2"].model(dtype=torch.float32))
    on = trainable(model)
    for b in (0, 1):
        for pair in (("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj"), ("ln_1", "ln_2")):
            assert sum(f"transformer.h.{b}.{m}.weight" in on for m in pair) == 1
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"} <= on
    assert count_params(model)[0] == method.expected_trainable(model)


# --------------------------------------------------------------------------------------------- the stage switch


def test_on_step_switches_halves_and_drops_frozen_optimizer_state(make_model: Any, sft_batch: dict) -> None:
    method = hft(stages=2)
    model = method.tune(make_model())
    params = dict(model.named_parameters())
    selectable = set(method.checkpoint_state(model))
    groups = method.param_groups(model, 1e-2, 0.1)
    assert {id(p) for g in groups for p in g["params"]} == {id(params[n]) for n in selectable}
    opt = build_optimizer(groups, TrainConfig(lr=1e-2, weight_decay=0.1))
    obj = OBJECTIVES.get("sft")(OBJECTIVES.config_class("sft")())

    def step(s: int) -> None:
        method.on_step(s, 6, model, opt)
        loss, _ = obj.loss(model, sft_batch, obj.num_items(sft_batch))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    for s in range(3):
        step(s)
    stage0 = trainable(model)
    assert {n for n in selectable if params[n] in opt.state} == stage0
    method.on_step(3, 6, model, opt)  # the boundary: stage 1
    stage1 = trainable(model)
    assert stage1 != stage0 and stage1 == {n for u in method.selection(1) for n in u.params} | {"model.embed_tokens.weight", "model.norm.weight"}
    assert {n for n in selectable if params[n] in opt.state} == stage0 & stage1  # newly frozen: state dropped
    frozen = {n: params[n].detach().clone() for n in selectable - stage1}
    step(3)
    assert all(torch.equal(params[n], t) for n, t in frozen.items())  # no update and no weight decay
    assert {n for n in selectable if params[n] in opt.state} == stage1


# --------------------------------------------------------------------------------------------- exact resume


def test_two_stage_run_resumed_in_stage_1_is_bit_exact(tmp_path: Path) -> None:
    from tunelab.train.loop import train

    over = ["model.name=tiny-llama", "data.train=builtin:code_instructions", "data.limit=24", "data.max_length=256",
            "method.name=hft", "method.stages=2", "train.max_steps=6", "train.save_every=2", "train.batch_size=2",
            "train.lr=1e-3", "train.weight_decay=0.1", "train.mixed_precision=no", "train.tensorboard=false",
            "eval.before=false", "eval.after=false"]
    a = tmp_path / "a"
    train(load_config(None, [*over, f"out={a}"]), quiet=True)
    want = load_file(a / "final" / "model.safetensors")
    ckpt = load_file(a / "checkpoints" / "step-4" / "trainable.safetensors")
    assert len(ckpt) == 2 * 9 + 2  # every tensor a stage may train, not only stage 1's half
    run = tmp_path / "b"
    shutil.copytree(a, run)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-6")  # step 4 is in stage 1 (steps 3-5)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["out"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    train(load_config(None, [*over, f"out={run}"]), resume=True, quiet=True)
    got = load_file(run / "final" / "model.safetensors")
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    base = PRESETS["tiny-llama"].model(dtype=torch.float32).state_dict()
    moved = {k for k in want if not torch.equal(want[k], base[k])}
    assert len(moved) > 9 + 2  # the two stages together trained more than one half


@pytest.mark.parametrize("bad", [{"stages": 0}, {"ratio": 0.5}])
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        hft(**bad)
