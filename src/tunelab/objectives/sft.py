"""Supervised fine-tuning: next-token cross-entropy on the labelled (by default assistant) tokens.

L = -(1/N) * sum_t log p_theta(y_t | x, y_<t), where N counts labelled tokens across the whole optimizer
step (all accumulation micro-batches), so gradient accumulation equals one big batch exactly. This is the
"per-token mean over the batch" normalisation (TRL's with num_items_in_batch), not a per-sequence mean.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunelab.objectives import OBJECTIVES
from tunelab.objectives._base import Objective
from tunelab.objectives._logprobs import label_logits, label_token_logprobs


class SFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["sft"] = "sft"
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed token cross-entropy / num_items. logits [N, V] and labels [N] at labelled positions only."""
    total = torch.nn.functional.cross_entropy(
        logits.float(), labels, reduction="sum", label_smoothing=label_smoothing
    )
    return total / max(num_items, 1)


@OBJECTIVES.register("sft")
class SFT(Objective):
    Config = SFTConfig
    batch_format = "sft"
    loss_items = "tokens"

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: int, ref: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
        if not self.cfg.label_smoothing:  # type: ignore[attr-defined]
            # log p(label) only: the head runs in chunks, so a long row's logits never exist at once
            lp, labels = label_token_logprobs(model, batch)
            # summed in fp64: a long fp32 sum drifts with its order, and accumulation must equal one big batch
            return (-lp.sum(dtype=torch.float64) / max(num_items, 1)).float(), {"tokens": float(labels.numel())}
        logits, labels = label_logits(model, batch)
        loss = sft_loss(logits, labels, num_items, self.cfg.label_smoothing)  # type: ignore[attr-defined]
        # no extra metrics here: a second softmax/argmax over the vocabulary costs as much as the loss itself
        return loss, {"tokens": float(labels.numel())}
