"""CRaSh (crash.py, _cka.py): linear CKA by hand and its invariances, the adjacent-cluster merge on a hand-made
similarity matrix, sequence pooling in padded and packed batches, the emulator's sharing, what trains, the cache
slots of shared blocks, finalize, and an end-to-end run through the real loop.

Most tests use an 8-block Llama with hidden size 32 and a 128-token vocabulary built here, deep enough to have
clusters of several blocks (the 2-block presets emulate one block).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._base import count_params
from tunelab.methods._cka import cluster_adjacent, linear_cka, pool, representative, sequence_spans
from tunelab.methods.crash import CrashPlan

# one block of the 8-block model, by hand: q 32x32, k and v 16x32 (2 kv heads x 8), o 32x32, gate/up/down 64x32,
# two norms of 32
BLOCK = 1024 + 512 + 512 + 1024 + 3 * 2048 + 2 * 32


def deep() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg).eval()


def crash(**kw: Any) -> Any:
    cls = METHODS.get("crash")
    return cls(cls.Config.model_validate({"name": "crash", **kw}))


def calibration(n: int = 2) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (4, 10), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def ids_batch() -> torch.Tensor:
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))


def test_linear_cka_by_hand() -> None:
    # one feature each: CKA is the squared correlation; centred x = [-1, 0, 1], y = [0, -1, 1] -> (1 / 2)^2
    assert linear_cka(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [0.0], [2.0]])) == pytest.approx(0.25)
    # centred X (4x2), Y (4x1): ||Y^T X||^2 = 8, ||X^T X||_F = 2 sqrt 2, ||Y^T Y|| = 4 -> 1 / sqrt 2
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    y = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])
    assert linear_cka(x, y) == pytest.approx(1 / math.sqrt(2))
    assert linear_cka(x, torch.ones(4, 3)) == 0.0  # a constant representation


def test_linear_cka_invariances() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 6, generator=gen, dtype=torch.float64), torch.randn(20, 4, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0)
    base = linear_cka(x, y)
    assert 0 < base < 1
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-9)
    assert linear_cka(3.7 * x, 0.2 * y) == pytest.approx(base, rel=1e-9)
    assert linear_cka(x + 5.0, y) == pytest.approx(base, rel=1e-9)
    assert linear_cka(x * torch.arange(1.0, 7.0, dtype=torch.float64), y) != pytest.approx(base, rel=1e-3)  # not invariant to anisotropic scaling


def _hand_sim() -> torch.Tensor:
    sim = torch.eye(5, dtype=torch.float64)
    for (i, j), v in {(0, 1): 0.9, (1, 2): 0.5, (2, 3): 0.95, (3, 4): 0.6, (2, 4): 0.3, (0, 3): 0.99, (1, 3): 0.99}.items():
        sim[i, j] = sim[j, i] = v
    return sim


def test_adjacent_merge_on_a_hand_made_matrix() -> None:
    sim = _hand_sim()
    # merges: (2,3) at 0.95, then (0,1) at 0.9, then [2,3]+[4] by the boundary 3-4 (0.6) over 1-2 (0.5); the high
    # non-boundary values (0,3) and (1,3) never count
    assert cluster_adjacent(sim, 4) == [[0], [1], [2, 3], [4]]
    assert cluster_adjacent(sim, 3) == [[0, 1], [2, 3], [4]]
    assert cluster_adjacent(sim, 2) == [[0, 1], [2, 3, 4]]
    assert cluster_adjacent(sim, 1) == [[0, 1, 2, 3, 4]]
    assert cluster_adjacent(torch.ones(3, 3), 2) == [[0, 1], [2]]  # ties: the leftmost pair
    # mean similarity to the others: 2 -> (0.95 + 0.3) / 2, 3 -> (0.95 + 0.6) / 2, 4 -> (0.3 + 0.6) / 2
    assert representative(sim, [2, 3, 4]) == 3
    assert representative(sim, [0, 1]) == 0 and representative(sim, [4]) == 4


def test_sequence_spans_and_pooling() -> None:
    padded = {"input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    assert sequence_spans(padded, 0) == [(0, 0, 3), (1, 0, 2)]
    packed = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 0, 0]]), "position_ids": torch.tensor([[0, 1, 0, 1, 2, 0, 1]])}
    assert sequence_spans(packed, 0) == [(0, 0, 2), (0, 2, 5)]  # the pad tail is dropped
    hidden = torch.arange(14.0).view(1, 7, 2)
    assert pool(hidden, [(0, 0, 2), (0, 2, 5)], "mean").tolist() == [[1.0, 2.0], [6.0, 7.0]]
    assert pool(hidden, [(0, 0, 2), (0, 2, 5)], "last").tolist() == [[2.0, 3.0], [8.0, 9.0]]


def test_adapter_counts_rule() -> None:
    assert [crash().adapter_counts(n) for n in (2, 3, 4, 5, 24)] == [(1, 0), (1, 1), (2, 1), (2, 2), (2, 2)]
    assert crash(adapter_bottom=3).adapter_counts(24) == (3, 2)
    assert crash(adapter_top=0).adapter_counts(5) == (2, 0)
    with pytest.raises(UserError, match="method.adapter_bottom/adapter_top: 2 \\+ 2"):
        crash(adapter_bottom=2, adapter_top=2).adapter_counts(4)
    with pytest.raises(UserError, match="nothing to train"):
        crash(adapter_bottom=0, adapter_top=0).adapter_counts(8)


def test_prepare_clusters_the_middle_blocks_deterministically() -> None:
    method, again = crash(), crash()
    method.prepare(deep(), calibration())
    again.prepare(deep(), calibration())
    plan = method.plan
    assert (plan.bottom, plan.top) == (2, 2) and len(plan.clusters) == 2  # K: half of the 4 middle blocks
    assert [i for c in plan.clusters for i in c] == [2, 3, 4, 5]
    assert plan.clusters == again.plan.clusters and torch.equal(plan.cka, again.plan.cka)
    assert plan.cka.shape == (8, 8) and torch.allclose(plan.cka.diagonal(), torch.ones(8, dtype=torch.float64))
    with pytest.raises(UserError, match="method.clusters: 5 clusters but only 4"):
        crash(clusters=5).prepare(deep(), calibration())
    with pytest.raises(RuntimeError, match="prepare"):
        crash().tune(deep())


def planned(clusters: list[list[int]], reps: list[int]) -> Any:
    method = crash()
    method.plan = CrashPlan(8, 2, 2, clusters, reps, torch.eye(8, dtype=torch.float64))
    return method


def test_the_emulator_shares_blocks_as_the_clusters_say() -> None:
    model = deep()
    originals = list(model.model.layers)
    method = planned([[2, 3, 4], [5]], [3, 5])
    emulator = method.tune(model)
    layers = emulator.model.layers
    assert len(layers) == 8
    assert [layers[i] is originals[j] for i, j in enumerate([0, 1, 3, 3, 3, 5, 6, 7])] == [True] * 8
    assert count_params(emulator)[0] == method.expected_trainable(emulator) == 4 * BLOCK


def test_only_adapter_blocks_get_gradients() -> None:
    method = crash()
    method.prepare(deep(), calibration())
    model = method.tune(deep()).train()
    ids = ids_batch()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    adapter = {id(p) for i in (0, 1, 6, 7) for p in model.model.layers[i].parameters()}
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == adapter == {id(p) for p in model.parameters() if p.requires_grad}


def test_shared_blocks_fill_one_cache_slot_per_depth() -> None:
    """Incremental decoding with a cache equals the full forward: the shared block writes each depth's slot."""
    model = planned([[2, 3, 4, 5]], [2]).tune(deep())
    ids = ids_batch()
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = model(input_ids=ids[:, :5], use_cache=True).cache
        assert [cache.get_seq_length(i) for i in range(8)] == [5] * 8  # every depth has its own slot
        rest = model(input_ids=ids[:, 5:], cache=cache, use_cache=True).logits
    assert torch.allclose(rest, full[:, 5:], atol=1e-5, rtol=0)


def test_finalize_plugs_the_original_middle_back_with_trained_adapters() -> None:
    base = {k: v.clone() for k, v in deep().state_dict().items()}
    model = deep()
    originals = list(model.model.layers)
    method = planned([[2, 3], [4, 5]], [2, 4])
    model = method.tune(model).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = ids_batch()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    opt.step()
    full = method.finalize(model)
    assert [a is b for a, b in zip(full.model.layers, originals, strict=True)] == [True] * 8
    assert [blk.self_attn.layer_idx for blk in full.model.layers] == list(range(8))
    state = full.state_dict()
    adapters = tuple(f"model.layers.{i}." for i in (0, 1, 6, 7))
    assert all(torch.equal(state[k], v) for k, v in base.items() if not k.startswith(adapters))  # middle, embeddings, norm
    for i in (0, 1, 6, 7):
        assert not torch.equal(state[f"model.layers.{i}.mlp.down_proj.weight"], base[f"model.layers.{i}.mlp.down_proj.weight"])


def test_merged_emulator_unshares_with_the_same_outputs() -> None:
    method = planned([[2, 3, 4, 5]], [2])
    model = method.tune(deep())
    ids = ids_batch()
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        merged = method.merged(model)
        assert len({id(b) for b in merged.model.layers}) == 8
        assert [blk.self_attn.layer_idx for blk in merged.model.layers] == list(range(8))
        assert torch.allclose(merged(input_ids=ids, use_cache=False).logits, want, atol=1e-6, rtol=0)


def test_save_final_refuses_the_emulator(tmp_path: Path) -> None:
    method = planned([[2, 3], [4, 5]], [2, 4])
    with pytest.raises(RuntimeError, match="finalize"):
        method.save_final(method.tune(deep()), tmp_path / "final")


def test_crash_run_through_the_loop(tmp_path: Path) -> None:
    from tunelab.config import validate
    from tunelab.export import load_tuned
    from tunelab.models.presets import PRESETS
    from tunelab.train.loop import train

    cfg = validate({
        "model": {"name": "tiny-llama"}, "out": str(tmp_path / "run"),
        "data": {"train": "builtin:code_instructions", "limit": 12, "valid_size": 0},
        "method": {"name": "crash", "calibration_batches": 2}, "eval": {"before": False, "after": False},
        "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "mixed_precision": "no", "tensorboard": False},
    })
    with torch.random.fork_rng(devices=[]):
        train(cfg, quiet=True)
    plan = json.loads((tmp_path / "run" / "final" / "crash_clusters.json").read_text())
    assert (plan["adapter_bottom"], plan["adapter_top"], plan["clusters"]) == (1, 0, [[1]])
    model, _, method = load_tuned(tmp_path / "run")
    base = PRESETS["tiny-llama"].model(dtype=torch.float32).state_dict()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items() if not k.startswith("model.layers.0."))
    assert not torch.equal(state["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert method.merged(model) is model
