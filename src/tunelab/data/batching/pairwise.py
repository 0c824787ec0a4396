"""Preference pairs: `prompt` + `chosen` + `rejected` (DPO, IPO, SimPO, ORPO, ASFT, ...).

Each of the three is a string or a list of {role, content} messages. Without `prompt`, `chosen` and
`rejected` are whole conversations sharing a prefix, and that shared prefix is the prompt (the common
"full conversation" form of public preference sets). A unit is [prompt+chosen, prompt+rejected] with loss
on the completions only; both go through the same forward pass. A pair whose chosen equals its rejected
teaches nothing and is dropped (counted as `identical_pair`).
"""

from __future__ import annotations

from typing import Any

from tunelab.data.batching._base import (
    Batcher,
    EncodeContext,
    Unit,
    as_messages,
    encode_completion,
    register,
    require,
)
from tunelab.errors import UserError


def split_pair(row: dict[str, Any], location: str) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """(prompt, chosen completion, rejected completion) as message lists."""
    if "prompt" in row:
        require(row, ("prompt", "chosen", "rejected"), location, "pairwise")
        prompt = as_messages(row["prompt"], "user", location, "prompt")
        return prompt, as_messages(row["chosen"], "assistant", location, "chosen"), as_messages(
            row["rejected"], "assistant", location, "rejected"
        )
    require(row, ("chosen", "rejected"), location, "pairwise")
    chosen = as_messages(row["chosen"], "assistant", location, "chosen")
    rejected = as_messages(row["rejected"], "assistant", location, "rejected")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and chosen[k - 1]["role"] == "assistant":  # the completion starts at an assistant turn
        k -= 1
    if k == 0 and len(chosen) > 1:
        raise UserError(
            f"{location}: without a 'prompt' field, 'chosen' and 'rejected' must be conversations that share "
            "their opening turns (the prompt); these share none"
        )
    return chosen[:k], chosen[k:], rejected[k:]


@register("pairwise")
class PairwiseBatcher(Batcher):
    def encode(self, row: dict[str, Any], location: str, ctx: EncodeContext) -> Unit | str:
        prompt, chosen, rejected = split_pair(row, location)
        if chosen == rejected:
            return "identical_pair"
        return Unit([encode_completion(ctx, prompt, chosen, location), encode_completion(ctx, prompt, rejected, location)])
