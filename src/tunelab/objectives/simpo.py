"""SimPO: "SimPO: Simple Preference Optimization with a Reference-Free Reward" (Meng, Xia, Chen, arXiv
2405.14734). The implicit reward of a response is its length-normalised log-likelihood scaled by beta,
r(y) = (beta / |y|) log pi(y|x), and the loss asks the chosen reward to beat the rejected one by a target
margin gamma: L = -log sigma(beta * (avg_logp(y_w) - avg_logp(y_l)) - gamma). No reference model. Defaults
beta 2.5, gamma 1.375 (gamma / beta = 0.55): the setting TRL's paper index gives for the paper, which tunes
both per base model (beta ~2-10, gamma / beta ~0.3-0.8). This is TRL's `CPOTrainer(loss_type="simpo",
cpo_alpha=0)` loss without label smoothing; no deviation from the paper.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from tunelab.objectives import OBJECTIVES
from tunelab.objectives._base import Batch, Objective
from tunelab.objectives._logprobs import sequence_logps
from tunelab.objectives._pairwise import pair_metrics, split_pairs

if TYPE_CHECKING:
    from tunelab.train.reference import Reference


class SimPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.5, gt=0, description="reward scale applied to the average log-prob difference")
    gamma: float = Field(1.375, ge=0, description="target reward margin between chosen and rejected")


def simpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, *, beta: float, gamma: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pair losses [P] and metrics from length-normalised (mean per token) log-probs."""
    chosen_rewards, rejected_rewards = beta * chosen_avg_logps, beta * rejected_avg_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, pair_metrics(chosen_rewards, rejected_rewards, chosen_avg_logps, rejected_avg_logps)




@OBJECTIVES.register("simpo")
class SimPO(Objective):
    """SimPO: reference-free preference loss on length-normalised log-probs with a target margin."""

    Config = SimPOConfig
    batch_format = "pairwise"
    needs_reference = False

    def loss(self, model: Any, batch: Batch, num_items: int, ref: Reference | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg: SimPOConfig = self.cfg  # type: ignore[assignment]
        chosen, rejected = split_pairs(sequence_logps(model, batch).mean, int(batch["sample_ids"].numel()))
        losses, metrics = simpo_loss(chosen, rejected, beta=cfg.beta, gamma=cfg.gamma)
        return losses.sum() / max(num_items, 1), metrics
