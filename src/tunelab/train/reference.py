"""Reference log-probs for objectives that compare the policy with a frozen reference (DPO, KTO, ...).

Chosen once per run (`train.reference`):
- `adapter`: the same model with the method's adapter switched off (`Method.disabled`), computed on the fly
  for each batch. No second copy of the model is held; it costs one extra no-grad forward per batch.
- `precomputed`: one pass over the train and validation units before training, with the base weights
  (before the method touches them, so it also serves full fine-tuning without a second model), cached to
  disk beside the tokenisation cache. The cache is keyed by the exact token ids and labels, the model config
  and the precision, and written in atomic shards, so a pass killed midway continues where it stopped.
- `auto`: `adapter` when the method can switch itself off, else `precomputed`.
Reference passes run in eval mode (no dropout) and never touch the RNG.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tunelab.data.batching import Batcher, Unit
from tunelab.objectives._logprobs import SeqLogps, sequence_logps

SHARD = 64  # units per cache shard: the most a kill -9 can cost the precompute pass


class Reference:
    def logps(self, model: Any, batch: dict[str, torch.Tensor]) -> SeqLogps:
        """Detached summed log-probs of the batch's sequences under the reference model."""
        raise NotImplementedError


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class AdapterOffReference(Reference):
    def __init__(self, method: Any, model: torch.nn.Module) -> None:
        self.method, self.model = method, model

    @torch.no_grad()
    def logps(self, model: Any, batch: dict[str, torch.Tensor]) -> SeqLogps:
        with self.method.disabled(self.model), eval_mode(self.model):
            return sequence_logps(self.model, batch).detach()


class PrecomputedReference(Reference):
    def __init__(self, table: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.table = table

    def logps(self, model: Any, batch: dict[str, torch.Tensor]) -> SeqLogps:
        rows = [self.table[int(s)] for s in batch["sample_ids"]]
        device = batch["input_ids"].device
        return SeqLogps(torch.cat([r[0] for r in rows]).to(device), torch.cat([r[1] for r in rows]).to(device))


def cache_key(units: list[Unit], model_cfg: dict[str, Any], precision: str) -> str:
    h = hashlib.sha256(json.dumps({"model": model_cfg, "precision": precision, "v": 1}, sort_keys=True).encode())
    for u in units:
        for s in u.seqs:
            h.update(torch.tensor(s.input_ids, dtype=torch.int64).numpy().tobytes())
            h.update(torch.tensor(s.labels, dtype=torch.int64).numpy().tobytes())
        h.update(str(u.sid).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def precompute(
    model: torch.nn.Module, units: list[Unit], batcher: Batcher, pad_id: int, cache: Path, *,
    batch_size: int, autocast: Any, progress: Any = None,
) -> PrecomputedReference:
    """Reference log-probs of every unit, shard by shard; finished shards on disk are reused."""
    cache.mkdir(parents=True, exist_ok=True)
    table: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    shards = [units[i : i + SHARD] for i in range(0, len(units), SHARD)]
    with eval_mode(model):
        for k, shard in enumerate(shards):
            path = cache / f"part-{k:05d}.pt"
            if path.is_file():
                table.update(torch.load(path, weights_only=True))
            else:
                part = _score(model, shard, batcher, pad_id, batch_size, autocast)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(part, tmp)
                os.replace(tmp, path)
                table.update(part)
            if progress is not None:
                progress(len(table), len(units))
    return PrecomputedReference(table)


def _score(model: Any, units: list[Unit], batcher: Batcher, pad_id: int, batch_size: int, autocast: Any) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    device = next(model.parameters()).device
    for i in range(0, len(units), batch_size):
        chunk = units[i : i + batch_size]
        batch = {k: v.to(device) for k, v in batcher.collate([[u] for u in chunk], pad_id, packed=False).items()}
        with autocast():
            lp = sequence_logps(model, batch)
        s, c = lp.sum.float().cpu(), lp.count.cpu()
        start = 0
        for u in chunk:
            n = len(u.seqs)
            out[u.sid] = (s[start : start + n].clone(), c[start : start + n].clone())
            start += n
    return out
