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
    rows = [{"prompt": f"Write f{i}(x).", "chosen": f"def f{i}(x):\n    return x + {i}", "rejected": f"def f{i}(x):\n    return {i}"} for i in range(n)]
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
