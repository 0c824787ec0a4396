"""Prompts alone (`prompt`: a string or messages), for objectives that generate their own completions.

A unit is the prompt rendered with the generation prompt and no labels; `collate` left-pads, as generation
wants. Nothing in tunelab trains on this format yet: online objectives (`Objective.online`) draw their prompts
from a task's problems and train on the judged rollouts in their own format (train/rollouts.py).
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.data.batching._base import Batcher, EncodeContext, Unit, prompt_of, register, require
from tunelab.data.templating import IGNORE, Encoded, render


@register("prompt_only")
class PromptOnlyBatcher(Batcher):
    needs_labels = False

    def encode(self, row: dict[str, Any], location: str, ctx: EncodeContext) -> Unit | str:
        require(row, ("prompt",), location, "prompt_only")
        msgs = prompt_of(row, location)
        if ctx.cfg.system_prompt and msgs[0]["role"] != "system":  # as every trained format does (encode_completion)
            msgs = [{"role": "system", "content": ctx.cfg.system_prompt}, *msgs]
        if ctx.template == "chat":
            ids = ctx.tok(render(ctx.tok, msgs, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        else:
            ids = ctx.tok("\n".join(m["content"] for m in msgs))["input_ids"]
        return Unit([Encoded(ids, [IGNORE] * len(ids))])

    def collate(self, rows: list[list[Unit]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
        units = [u for row in rows for u in row]
        width = max(len(u.seqs[0].input_ids) for u in units)
        ids = torch.full((len(units), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(units), width), dtype=torch.long)
        for b, u in enumerate(units):
            seq = u.seqs[0].input_ids
            ids[b, width - len(seq) :] = torch.tensor(seq)
            mask[b, width - len(seq) :] = 1
        return {"input_ids": ids, "attention_mask": mask, "sample_ids": torch.tensor([u.sid for u in units])}
