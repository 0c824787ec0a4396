"""The precomputed reference: one pass, cached in atomic shards; a pass killed midway continues where it
stopped and ends on the same table as an uninterrupted one."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_jsonl

import tunelab.train.reference as refmod
from tunelab.config import DataConfig
from tunelab.data import tokenize_cached
from tunelab.data.batching import get_batcher
from tunelab.objectives._logprobs import sequence_logps


def _units(tmp_path: Path, tok: Any, n: int = 7) -> list[Any]:
    # lengths differ from unit to unit and between chosen and rejected, so a table row mixed up with another shows
    terms = lambda k: " + ".join(["x"] * k)  # noqa: E731
    rows = [{"prompt": f"Write f{i}(x).", "chosen": f"def f{i}(x):\n    return {terms(i + 1)}", "rejected": f"def f{i}(x):\n    return {terms(2 * i + 3)} - 1"} for i in range(n)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    return tokenize_cached(str(path), tok, DataConfig(train=str(path), max_length=128), "train", "pairwise").samples


class Killed(Exception):
    pass


def test_precompute_resumes_after_a_crash(tmp_path: Path, tok: Any, make_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refmod, "SHARD", 3)
    units, model, batcher = _units(tmp_path, tok), make_model(), get_batcher("pairwise")
    clean = refmod.precompute(model, units, batcher, tok.pad_token_id, tmp_path / "clean", batch_size=2, autocast=nullcontext)

    calls: list[int] = []
    real = refmod._score

    def crashing(model: Any, chunk: list[Any], *a: Any) -> Any:
        calls.append(len(chunk))
        if len(calls) == 2:
            raise Killed  # the process dies while scoring the second shard
        return real(model, chunk, *a)

    monkeypatch.setattr(refmod, "_score", crashing)
    with pytest.raises(Killed):
        refmod.precompute(model, units, batcher, tok.pad_token_id, tmp_path / "c", batch_size=2, autocast=nullcontext)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["part-00000.pt"]
    calls.clear()

    def counting(model: Any, chunk: list[Any], *a: Any) -> Any:
        calls.append(len(chunk))
        return real(model, chunk, *a)

    monkeypatch.setattr(refmod, "_score", counting)
    resumed = refmod.precompute(model, units, batcher, tok.pad_token_id, tmp_path / "c", batch_size=2, autocast=nullcontext)
    assert calls == [3, 1]  # only the shards not on disk were scored
    assert clean.table.keys() == resumed.table.keys() == {u.sid for u in units}
    for sid in clean.table:
        assert torch.equal(clean.table[sid][0], resumed.table[sid][0]) and torch.equal(clean.table[sid][1], resumed.table[sid][1])


def test_precomputed_lookup_matches_the_model(tmp_path: Path, tok: Any, make_model: Any) -> None:
    units, model, batcher = _units(tmp_path, tok), make_model(), get_batcher("pairwise")
    ref = refmod.precompute(model, units, batcher, tok.pad_token_id, tmp_path / "r", batch_size=4, autocast=nullcontext)
    batch = batcher.collate([units[4:], units[:2]], tok.pad_token_id, packed=True)  # another layout and order
    got = ref.logps(model, batch)
    with torch.no_grad():
        want = sequence_logps(model, batch)
    assert torch.equal(got.count, want.count)
    assert torch.allclose(got.sum, want.sum, atol=1e-4)


def test_cache_key_changes_with_tokens_model_and_precision(tmp_path: Path, tok: Any) -> None:
    units = _units(tmp_path, tok)
    k = refmod.cache_key(units, {"name": "m"}, "no")
    assert k == refmod.cache_key(units, {"name": "m"}, "no")
    assert len({k, refmod.cache_key(units[:-1], {"name": "m"}, "no"), refmod.cache_key(units, {"name": "m2"}, "no"),
                refmod.cache_key(units, {"name": "m"}, "bf16")}) == 4


def test_table_rows_by_hand(tmp_path: Path, tok: Any, make_model: Any) -> None:
    """Each unit's row is its own two sequences' summed log-probs and token counts, scored `batch_size` units per
    forward pass, one unit per padded row."""
    units, model, batcher = _units(tmp_path, tok), make_model(), get_batcher("pairwise")
    counts = [[sum(1 for x in s.labels[1:] if x != -100) for s in u.seqs] for u in units]
    assert len({tuple(c) for c in counts}) == len(units)  # every unit's lengths differ
    forwards: list[int] = []
    model.model.register_forward_pre_hook(lambda m, a, kw: forwards.append(kw["input_ids"].shape[0]), with_kwargs=True)  # the decoder
    ref = refmod.precompute(model, units, batcher, tok.pad_token_id, tmp_path / "r", batch_size=3, autocast=nullcontext)
    assert forwards == [6, 6, 2]  # 7 units of 2 sequences, 3 units a pass
    for u in units:
        with torch.no_grad():
            alone = sequence_logps(model, batcher.collate([[u]], tok.pad_token_id, packed=False))
        s, c = ref.table[u.sid]
        assert c.tolist() == alone.count.tolist() == counts[units.index(u)]
        torch.testing.assert_close(s, alone.sum, rtol=0, atol=1e-4)


def test_lookup_follows_the_batch_device(tmp_path: Path, tok: Any, make_model: Any) -> None:
    """The table lives on the CPU; a batch on the accelerator gets its rows there (meta stands in for it)."""
    units, model, batcher = _units(tmp_path, tok, 3), make_model(), get_batcher("pairwise")
    ref = refmod.precompute(model, units, batcher, tok.pad_token_id, tmp_path / "r", batch_size=2, autocast=nullcontext)
    batch = batcher.collate([[units[2]], [units[0]]], tok.pad_token_id, packed=False)
    batch["input_ids"] = batch["input_ids"].to("meta")  # (sample ids are read on the host)
    got = ref.logps(model, batch)
    assert got.sum.device.type == got.count.device.type == "meta" and got.count.shape == (4,)


def test_cache_key_follows_sample_ids(tmp_path: Path, tok: Any) -> None:
    """The table is keyed by sample id: the same units numbered otherwise must not reuse it."""
    import dataclasses

    units = _units(tmp_path, tok, 3)
    renumbered = [dataclasses.replace(u, sid=u.sid + 10) for u in units]
    assert refmod.cache_key(units, {"name": "m"}, "no") != refmod.cache_key(renumbered, {"name": "m"}, "no")


def test_adapter_off_reference_is_the_base_model(tmp_path: Path, tok: Any, make_model: Any) -> None:
    """With the adapter switched off the tuned model scores as the base model did, in eval mode, without
    gradients, and training resumes with the adapter on."""
    from tunelab.methods import METHODS
    from tunelab.methods.lora import LoRAConfig

    units, batcher = _units(tmp_path, tok, 3), get_batcher("pairwise")
    batch = batcher.collate([[u] for u in units], tok.pad_token_id, packed=False)
    base = make_model()
    with torch.no_grad():
        want = sequence_logps(base, batch)
    method = METHODS.get("lora")(LoRAConfig(r=4))
    model = method.tune(base).train()
    with torch.no_grad():  # a trained adapter (LoRA starts as the identity): the tuned model differs from the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tuned = sequence_logps(model, batch)
    assert not torch.allclose(tuned.sum, want.sum, atol=1e-3)
    got = refmod.AdapterOffReference(method, model).logps(model, batch)
    assert not got.sum.requires_grad and torch.equal(got.count, want.count)
    torch.testing.assert_close(got.sum, want.sum, rtol=0, atol=1e-5)
    assert model.training
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, batch).sum, tuned.sum, rtol=0, atol=0)  # the adapter is back on


def test_cache_key_is_stable_across_versions() -> None:
    """The key of a fixed input is pinned: a change in how the key is made would silently throw away every user's
    precomputed reference tables (a full pass of the model over the data). When the format must change, change
    this constant on purpose, together with the key's "v"."""
    from tunelab.data.batching import Unit
    from tunelab.data.templating import Encoded

    units = [Unit([Encoded([1, 2, 3], [-100, 2, 3]), Encoded([1, 4], [-100, 4])], sid=0), Unit([Encoded([5], [5])], sid=3)]
    assert refmod.cache_key(units, {"name": "m", "dtype": "auto"}, "no") == "79b490c3db037f38cd18e590"
