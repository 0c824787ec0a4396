"""Unpaired feedback: `prompt` + `completion` + `label` (true = desirable), for KTO.

A unit is [prompt+completion, prompt+another sample's completion]. The second, mismatched sequence serves
KTO's reference-point estimate z0 = KL(policy || reference), which the paper estimates from mismatched
(x_i, y_j) pairs. Deviation: the mismatch is fixed at encode time (sample i borrows sample i+1's
completion, cyclically) rather than re-drawn from whatever shares the micro-batch; it is the same estimator
in expectation and keeps a unit self-contained, so micro-batches and resume stay deterministic.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.data.batching._base import (
    Batcher,
    EncodeContext,
    Unit,
    as_messages,
    encode_completion,
    prompt_of,
    register,
    require,
)
from tunelab.errors import UserError

_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _label(value: Any, location: str) -> bool:
    """A bool, 0/1, or the words true/false (CSV and Parquet files carry them as text)."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _WORDS:
        return _WORDS[value.strip().lower()]
    raise UserError(f"{location}: 'label' must be true (desirable) or false (undesirable), got {value!r}")


@register("unpaired")
class UnpairedBatcher(Batcher):
    def encode(self, row: dict[str, Any], location: str, ctx: EncodeContext) -> Unit | str:
        require(row, ("prompt", "completion", "label"), location, "unpaired")
        desirable = _label(row["label"], location)
        prompt = prompt_of(row, location)
        completion = as_messages(row["completion"], "assistant", location, "completion")
        seq = encode_completion(ctx, prompt, completion, location)
        return Unit([seq], {"desirable": desirable, "prompt": prompt, "completion": completion, "location": location})

    def finalize(self, units: list[Unit], ctx: EncodeContext) -> list[Unit]:
        completions = [u.meta["completion"] for u in units]
        for i, u in enumerate(units):
            other = completions[(i + 1) % len(units)]
            kl_seq = encode_completion(ctx, u.meta["prompt"], other, u.meta["location"])
            kl_seq.input_ids, kl_seq.labels = kl_seq.input_ids[: ctx.cfg.max_length], kl_seq.labels[: ctx.cfg.max_length]
            u.seqs = u.seqs[:1] + [kl_seq]
            u.meta = {"desirable": u.meta["desirable"]}
        return units

    def collate_meta(self, units: list[Unit]) -> dict[str, torch.Tensor]:
        return {"desirable": torch.tensor([u.meta["desirable"] for u in units], dtype=torch.bool)}
