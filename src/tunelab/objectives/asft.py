"""ASFT: "ASFT: Aligned Supervised Fine-Tuning through Absolute Likelihood" (Wang, Sun, Hua, Fang, arXiv
2409.10571). Instead of a Bradley-Terry comparison, each response of a pair gets its own absolute
target: with p(y) = exp(avg_logp(y|x)) (per-token mean, as in ORPO) and r(y) = log(p / (1 - p)),
L = -avg_logp(y_w) - lambda * [log sigma(beta r(y_w)) + log sigma(-beta r(y_l))], an SFT term plus a binary
cross-entropy pushing p(y_w) towards 1 and p(y_l) towards 0 independently. No reference model. With
beta = 1 (the paper's form) sigma(r) = p, so L = -(1 + lambda) log p(y_w) - lambda log(1 - p(y_l)). The
temperature beta comes from the restatement in "The Differences Between Direct Alignment Algorithms are a
Blur" (arXiv 2502.01237), which reports beta ~0.1-0.3 working best; default 1.0 keeps the paper's loss.
Default lambda 0.1 is UNCONFIRMED: we could not verify the paper's value, and 0.1 follows ORPO. The SFT
term is each pair's own per-token mean NLL (as in our ORPO), so gradient accumulation is exact. No
reference implementation was found; tests check the maths by hand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from tunelab.objectives import OBJECTIVES
from tunelab.objectives._base import Batch, Objective
from tunelab.objectives._logprobs import sequence_logps
from tunelab.objectives._pairwise import log_odds, pair_metrics, split_pairs

if TYPE_CHECKING:
    from tunelab.train.reference import Reference

# log(1 - exp(x)) is never evaluated above this: p = 1 exactly would give log(0)


class ASFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["asft"] = "asft"
    lam: float = Field(0.1, ge=0, description="weight lambda of the absolute-likelihood term (UNCONFIRMED default)")
    beta: float = Field(1.0, gt=0, description="temperature on the log-odds inside the sigmoids (1 = the paper)")




def asft_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, *, lam: float, beta: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pair losses [P] and metrics from mean per-token log-probs of chosen and rejected responses."""
    chosen, rejected = chosen_avg_logps.float(), rejected_avg_logps.float()
    chosen_odds, rejected_odds = beta * log_odds(chosen), beta * log_odds(rejected)
    align = -(F.logsigmoid(chosen_odds) + F.logsigmoid(-rejected_odds))
    losses = -chosen + lam * align
    metrics = pair_metrics(chosen_odds, rejected_odds, chosen, rejected, nll=-chosen, align_loss=align)
    return losses, metrics




@OBJECTIVES.register("asft")
class ASFT(Objective):
    """ASFT: SFT plus absolute-likelihood terms pushing p(chosen) up and p(rejected) down, no reference."""

    Config = ASFTConfig
    batch_format = "pairwise"
    needs_reference = False

    def loss(self, model: Any, batch: Batch, num_items: int, ref: Reference | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg: ASFTConfig = self.cfg  # type: ignore[assignment]
        chosen, rejected = split_pairs(sequence_logps(model, batch).mean, int(batch["sample_ids"].numel()))
        losses, metrics = asft_loss(chosen, rejected, lam=cfg.lam, beta=cfg.beta)
        return losses.sum() / max(num_items, 1), metrics
