"""Several targets for one prompt: `prompt` + `targets` (a list of k >= 2 strings or message lists, the same k
in every row), for multi-objective SFT such as MORepair's patch + repair rationale.

A unit holds the k prompt+target sequences (loss on each target); the batch adds `target_index` [S], which of
the k targets each sequence is, so the objective can weigh them.
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


@register("multi_target")
class MultiTargetBatcher(Batcher):
    def encode(self, row: dict[str, Any], location: str, ctx: EncodeContext) -> Unit | str:
        require(row, ("prompt", "targets"), location, "multi_target")
        targets = row["targets"]
        if not isinstance(targets, list) or len(targets) < 2:
            raise UserError(f"{location}: 'targets' must be a list of at least 2 targets (e.g. [patch, rationale])")
        k = ctx.state.setdefault("k", len(targets))
        if len(targets) != k:
            raise UserError(f"{location}: {len(targets)} targets, but earlier rows have {k}; every row needs the same number")
        prompt = prompt_of(row, location)
        seqs = [encode_completion(ctx, prompt, as_messages(t, "assistant", location, f"targets[{j}]"), location) for j, t in enumerate(targets)]
        return Unit(seqs)

    def collate_meta(self, units: list[Unit]) -> dict[str, torch.Tensor]:
        return {"target_index": torch.tensor([j for u in units for j in range(len(u.seqs))], dtype=torch.long)}
