"""Ranked responses: `prompt` + `responses` (k >= 2) + `scores` (k numbers, higher is better), for RRHF.

A unit holds the k prompt+response sequences (loss on the responses); the batch adds `scores` [S] and
`seq_unit` [S] (the unit, within the micro-batch, of each sequence), since k may differ between prompts.
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


@register("ranked")
class RankedBatcher(Batcher):
    def encode(self, row: dict[str, Any], location: str, ctx: EncodeContext) -> Unit | str:
        require(row, ("prompt", "responses", "scores"), location, "ranked")
        responses, scores = row["responses"], row["scores"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise UserError(f"{location}: 'responses' must be a list of at least 2 responses")
        if not isinstance(scores, list) or len(scores) != len(responses):
            n = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise UserError(f"{location}: 'scores' must be a list with one number per response ({len(responses)} responses, got {n})")
        if not all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores):
            raise UserError(f"{location}: 'scores' must all be numbers")
        prompt = prompt_of(row, location)
        seqs = [
            encode_completion(ctx, prompt, as_messages(r, "assistant", location, f"responses[{j}]"), location)
            for j, r in enumerate(responses)
        ]
        return Unit(seqs, {"scores": [float(s) for s in scores]})

    def collate_meta(self, units: list[Unit]) -> dict[str, torch.Tensor]:
        scores = [s for u in units for s in u.meta["scores"]]
        owner = [i for i, u in enumerate(units) for _ in u.seqs]
        return {"scores": torch.tensor(scores, dtype=torch.float32), "seq_unit": torch.tensor(owner, dtype=torch.long)}
