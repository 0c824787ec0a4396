"""Grafting (graft.py): the relaxed-mask formula and top-s selection by hand, the grafted model at init, what
trains, the rounding in finalize, the saved model through `load_tuned`, and the checks on the fine-tuned run.

The fine-tuned runs are written by hand (a tiny model with a known weight change saved as a finished `full` run),
so every delta is known; one end-to-end run goes through the real loop.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.config import ModelConfig
from tunelab.errors import UserError
from tunelab.export import load_tuned
from tunelab.methods import METHODS
from tunelab.methods._base import count_params
from tunelab.methods.graft import relaxed_mask, top_fraction_mask
from tunelab.models.presets import PRESETS

# tiny-llama's block parameters, by hand: q 64x64, k and v 32x64 (2 kv heads x 16), o 64x64, gate/up/down
# 128x64, two norms of 64; two blocks
BLOCK_WEIGHTS = 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192 + 2 * 64)
# entries of the fine-tuned delta far larger than the rest: the top ceil(1e-4 * 73984) = 8
PLANTED = [("model.layers.0.self_attn.q_proj.weight", (3, 5)), ("model.layers.0.mlp.up_proj.weight", (7, 1)),
           ("model.layers.1.mlp.down_proj.weight", (2, 100)), ("model.layers.1.self_attn.v_proj.weight", (0, 0)),
           ("model.layers.0.input_layernorm.weight", (9,)), ("model.layers.1.self_attn.o_proj.weight", (63, 63)),
           ("model.layers.0.mlp.gate_proj.weight", (127, 0)), ("model.layers.1.self_attn.k_proj.weight", (31, 2))]


def tiny(arch: str = "tiny-llama") -> torch.nn.Module:
    return PRESETS[arch].model(dtype=torch.float32).eval()


def write_run(run: Path, arch: str, model: torch.nn.Module, method: dict[str, Any] | None = None) -> Path:
    """A finished run directory holding `model` as the run's final weights (what the loop's _finish writes)."""
    method = method or {"name": "full"}
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(json.dumps({"model": {"name": arch}, "method": method}))  # JSON is YAML
    model.save_pretrained(run / "final", safe_serialization=True)
    meta = {"method": method["name"], "model": ModelConfig(name=arch).model_dump(), "saved_format": "full"}
    (run / "final" / "tunelab.json").write_text(json.dumps(meta))
    return run


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama with every block weight moved by < 1e-3 and the PLANTED entries by 0.5 + 0.01 i."""
    model = tiny()
    gen = torch.Generator().manual_seed(1)
    blocks = {n for n, _ in model.named_parameters() if ".layers." in n}
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n in sorted(blocks):
            params[n].add_((torch.rand(params[n].shape, generator=gen) - 0.5) * 2e-3)
        for i, (n, idx) in enumerate(PLANTED):
            params[n][idx] += 0.5 + 0.01 * i
    return write_run(tmp_path_factory.mktemp("ft") / "run", "tiny-llama", model)


def graft(finetuned: Path, **kw: Any) -> Any:
    cls = METHODS.get("graft")
    return cls(cls.Config.model_validate({"name": "graft", "finetuned": str(finetuned), **kw}))


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def test_gamma_formula_by_hand() -> None:
    base = torch.tensor([0.0, 1.0, 0.0, 1.0])
    logits_ = torch.tensor([0.5, 10.0, 12.0, 7.0])
    s = [1 / (1 + math.exp(-(v - 10.0))) for v in (0.5, 10.0, 12.0, 7.0)]
    want = torch.tensor([s[0], 1 - s[1], s[2], 1 - s[3]])  # gamma_base=1 entries count down from 1
    assert torch.allclose(relaxed_mask(base, logits_, 10.0), want, atol=1e-7, rtol=0)
    assert relaxed_mask(base, logits_, 10.0)[1] == 0.5


def test_top_s_selection_by_hand() -> None:
    deltas = [torch.tensor([0.1, -0.5, 0.2]), torch.tensor([[0.05, 0.4], [-0.3, 0.0]])]
    got = top_fraction_mask(deltas, 0.3)  # N = 7, k = ceil(2.1) = 3: |-0.5|, 0.4, |-0.3|
    assert got[0].tolist() == [0.0, 1.0, 0.0] and got[1].tolist() == [[0.0, 1.0], [1.0, 0.0]]
    tiny_s = top_fraction_mask(deltas, 1e-9)  # at least one weight
    assert sum(int(m.sum()) for m in tiny_s) == 1 and tiny_s[0][1] == 1.0
    ties = top_fraction_mask([torch.tensor([0.2, 0.7]), torch.tensor([0.7])], 0.3)  # k = ceil(0.9) = 1 of two equal: the first
    assert ties[0].tolist() == [0.0, 1.0] and ties[1].tolist() == [0.0]


def test_trainable_is_one_logit_per_grafted_weight(finetuned: Path) -> None:
    method = graft(finetuned)
    model = method.tune(tiny())
    assert method.expected_trainable(model) == BLOCK_WEIGHTS == count_params(model)[0]
    only_q = graft(finetuned, graft_params=r"q_proj\.weight$")
    assert count_params(only_q.tune(tiny()))[0] == only_q.expected_trainable(None) == 2 * 4096  # type: ignore[arg-type]


def test_init_with_closed_relaxation_is_pre_plus_gamma_base_delta(finetuned: Path, sft_batch: dict) -> None:
    method = graft(finetuned)
    model = method.tune(tiny())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".logits"):
                p.fill_(-100.0)  # sigmoid(-110) is 0 in fp32: gamma = gamma_base exactly
    ft = dict(load_tuned(finetuned)[0].named_parameters())
    want = tiny()
    with torch.no_grad():
        params = dict(want.named_parameters())
        for n, idx in PLANTED:  # gamma_base is 1 exactly there (the top 8 of 73984 at s = 1e-4)
            params[n][idx] = ft[n][idx]
    assert torch.allclose(logits(model, sft_batch), logits(want, sft_batch), atol=1e-6, rtol=0)
    assert not torch.allclose(logits(tiny(), sft_batch), logits(want, sft_batch), atol=1e-3, rtol=0)


def test_only_the_mask_logits_change_in_a_step(finetuned: Path, sft_batch: dict) -> None:
    from tunelab.objectives import OBJECTIVES

    method = graft(finetuned)
    model = method.tune(tiny()).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(method.param_groups(model, 1e-2, 0.1)[0]["params"], lr=1e-2)
    obj = OBJECTIVES.get("sft")(OBJECTIVES.config_class("sft")())
    obj.loss(model, sft_batch, obj.num_items(sft_batch))[0].backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(n.endswith(".logits") for n in changed)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith(".logits"))
    assert {g["weight_decay"] for g in method.param_groups(model, 1e-2, 0.1)} == {0.0}


def test_finalize_rounds_and_the_saved_model_loads(finetuned: Path, sft_batch: dict, tmp_path: Path) -> None:
    method = graft(finetuned)
    model = method.tune(tiny())
    q = "model.layers.0.self_attn.q_proj.weight"
    mod = model.get_submodule("model.layers.0.self_attn.q_proj").parametrizations["weight"][0]
    with torch.no_grad():
        mod.logits[3, 5] = 10.0 + 1.0  # a planted (gamma_base = 1) weight: gamma = 1 - sigmoid(1) = 0.27 -> dropped
        mod.logits[0, :4] = 10.0 + 1.0  # four gamma_base = 0 weights: gamma = sigmoid(1) = 0.73 -> kept
    final = method.finalize(model)
    assert not any("parametrizations" in n for n in final.state_dict())
    assert set(final.state_dict()) == set(tiny().state_dict())
    assert method.kept is not None and method.kept[q] == 4 and sum(method.kept.values()) == 8 - 1 + 4
    ft = dict(load_tuned(finetuned)[0].named_parameters())
    pre = dict(tiny().named_parameters())
    keep = torch.zeros_like(pre[q], dtype=torch.bool)
    keep[0, :4] = True
    assert torch.equal(dict(final.named_parameters())[q], torch.where(keep, pre[q] + (ft[q] - pre[q]), pre[q]))
    other = "model.layers.1.mlp.down_proj.weight"  # untouched logits: only its planted entry is kept
    assert int((dict(final.named_parameters())[other] != pre[other]).sum()) == 1
    want = logits(final, sft_batch)

    run = tmp_path / "graft-run"
    method.save_final(final, run / "final")
    (run / "config.yaml").write_text(json.dumps({"model": {"name": "tiny-llama"}, "method": {"name": "graft", "finetuned": str(finetuned)}}))
    (run / "final" / "tunelab.json").write_text(json.dumps({"method": "graft", "model": ModelConfig(name="tiny-llama").model_dump(),
                                                            "saved_format": "full"}))
    stats = json.loads((run / "final" / "graft_mask.json").read_text())
    assert stats["kept_weights"] == 11 and stats["grafted_weights"] == BLOCK_WEIGHTS and stats["kept"][q] == 4
    loaded, _, loaded_method = load_tuned(run)
    assert torch.equal(logits(loaded, sft_batch), want)
    assert loaded_method.merged(loaded) is loaded


def test_save_final_refuses_the_unrounded_model(finetuned: Path, tmp_path: Path) -> None:
    method = graft(finetuned)
    with pytest.raises(RuntimeError, match="finalize"):
        method.save_final(method.tune(tiny()), tmp_path / "final")


def test_merged_folds_the_relaxed_mask(finetuned: Path, sft_batch: dict) -> None:
    method = graft(finetuned)
    model = method.tune(tiny())
    want = logits(model, sft_batch)
    merged = method.merged(model)
    assert set(merged.state_dict()) == set(tiny().state_dict())
    assert torch.allclose(logits(merged, sft_batch), want, atol=1e-6, rtol=0)


def test_a_mismatched_or_missing_run_is_a_user_error(tmp_path: Path) -> None:
    other = write_run(tmp_path / "gpt2-run", "tiny-gpt2", tiny("tiny-gpt2"))
    with pytest.raises(UserError, match=r"^method\.finetuned: .*another base model"):
        graft(other).tune(tiny())
    with pytest.raises(UserError, match=r"^method\.finetuned: "):
        graft(tmp_path / "nowhere").tune(tiny())


def test_bad_graft_params_are_user_errors(finetuned: Path) -> None:
    with pytest.raises(UserError, match="method.graft_params: .*tied"):
        graft(finetuned, graft_params="embed_tokens").tune(tiny())
    with pytest.raises(UserError, match="method.graft_params: .*matches no"):
        graft(finetuned, graft_params="no_such_tensor").tune(tiny())


def test_graft_run_through_the_loop(finetuned: Path, tmp_path: Path) -> None:
    """The real loop: finalize rounds, RUN/final is a plain model whose block weights are pre or ft, nothing else."""
    from tunelab.config import validate
    from tunelab.train.loop import train

    cfg = validate({
        "model": {"name": "tiny-llama"}, "out": str(tmp_path / "run"),
        "data": {"train": "builtin:code_instructions", "limit": 8, "valid_size": 0},
        "method": {"name": "graft", "finetuned": str(finetuned)}, "eval": {"before": False, "after": False},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 0.5, "mixed_precision": "no", "tensorboard": False},
    })
    with torch.random.fork_rng(devices=[]):
        result = train(cfg, quiet=True)
    assert result.summary["trainable_params"] == BLOCK_WEIGHTS
    stats = json.loads((tmp_path / "run" / "final" / "graft_mask.json").read_text())
    loaded = dict(load_tuned(tmp_path / "run")[0].named_parameters())
    ft = dict(load_tuned(finetuned)[0].named_parameters())
    kept = 0
    for n, p in tiny().named_parameters():
        moved = loaded[n] != p
        assert torch.equal(loaded[n], torch.where(moved, p + (ft[n] - p), p)), n
        kept += int(moved.sum())
        assert n in stats["kept"] or not moved.any()
    assert kept == stats["kept_weights"] >= 1


def test_graft_resumes_bit_exactly(finetuned: Path, tmp_path: Path) -> None:
    """A resume rebuilds delta, gamma_base and the S init from the same runs and loads S from the checkpoint."""
    import shutil

    from safetensors.torch import load_file

    from tunelab.config import validate
    from tunelab.train.loop import train

    def cfg(out: Path) -> Any:
        return validate({
            "model": {"name": "tiny-llama"}, "out": str(out), "data": {"train": "builtin:code_instructions", "limit": 8, "valid_size": 0},
            "method": {"name": "graft", "finetuned": str(finetuned)}, "eval": {"before": False, "after": False},
            "train": {"max_steps": 2, "save_every": 1, "batch_size": 2, "lr": 0.5, "mixed_precision": "no", "tensorboard": False},
        })

    with torch.random.fork_rng(devices=[]):
        train(cfg(tmp_path / "a"), quiet=True)
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        shutil.rmtree(tmp_path / "b" / "final")
        shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-2")
        saved = tmp_path / "b" / "config.yaml"
        saved.write_text(saved.read_text().replace(str(tmp_path / "a"), str(tmp_path / "b")))
        train(cfg(tmp_path / "b"), resume=True, quiet=True)
    want = load_file(tmp_path / "a" / "checkpoints" / "step-2" / "trainable.safetensors")
    got = load_file(tmp_path / "b" / "checkpoints" / "step-2" / "trainable.safetensors")
    assert len(want) == 2 * 9 and all(k.endswith(".logits") for k in want)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    step1 = load_file(tmp_path / "a" / "checkpoints" / "step-1" / "trainable.safetensors")
    assert not all(torch.equal(step1[k], want[k]) for k in want)  # S moved in step 2
