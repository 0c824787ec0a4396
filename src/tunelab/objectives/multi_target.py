"""Multi-target SFT, after MORepair (Yang et al., "MORepair: Teaching LLMs to Repair Code via Multi-Objective
Fine-tuning", arXiv 2404.12636): one prompt, several targets (the paper: the repaired code and a natural-language
repair rationale), trained jointly with L = sum_j w_j * NLL_j, where NLL_j is the mean token negative
log-likelihood of target j given the prompt. Data: `prompt` + `targets` (k strings or message lists, see
data/batching/multi_target.py). Defaults: weights [1.0, 1.0] (equal weighting of the two objectives; the paper's
exact weighting is not restated here: UNCONFIRMED). Deviation: each target's NLL is its own per-token mean and the
loss is averaged over prompts (num_items = prompts in the step), so gradient accumulation stays exact; a pure
token-level normalisation would let the longer target (usually the rationale) dominate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunelab.objectives import OBJECTIVES
from tunelab.objectives._base import Batch, Objective
from tunelab.objectives._logprobs import sequence_logps

if TYPE_CHECKING:
    from tunelab.train.reference import Reference


class MultiTargetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["multi_target"] = "multi_target"
    weights: list[float] = Field(default_factory=lambda: [1.0, 1.0], min_length=2, description="w_j per target, in the rows' target order")


def multi_target_loss(mean_logps: torch.Tensor, target_index: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-prompt losses sum_j w_j * (-mean_logp_j) from per-sequence mean log-probs [S] and their target index [S].

    Sequences come prompt by prompt, targets 0..k-1 in order, so reshaping to [U, k] groups them by prompt.
    """
    k = int(weights.numel())
    if mean_logps.numel() % k or not torch.equal(target_index, torch.arange(k, device=target_index.device).repeat(mean_logps.numel() // k)):
        raise ValueError(f"multi_target: expected {k} targets per prompt, in order; the data has another count (set objective.weights)")
    nll = -mean_logps.reshape(-1, k)
    losses = (nll * weights.to(nll)).sum(dim=1)
    per_target = nll.detach().mean(dim=0).tolist()
    return losses, {f"nll/target_{j}": v for j, v in enumerate(per_target)}


@OBJECTIVES.register("multi_target")
class MultiTarget(Objective):
    """Multi-target SFT (MORepair): a weighted sum of per-target NLLs, e.g. patch + rationale."""

    Config = MultiTargetConfig
    batch_format = "multi_target"

    def loss(self, model: Any, batch: Batch, num_items: int, ref: Reference | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        weights = torch.tensor(self.cfg.weights)  # type: ignore[attr-defined]
        losses, metrics = multi_target_loss(sequence_logps(model, batch).mean, batch["target_index"], weights)
        return losses.sum() / max(num_items, 1), metrics
