"""ORPO: "ORPO: Monolithic Preference Optimization without Reference Model" (Hong, Lee, Thorne, arXiv
2403.07691). With p(y) = exp(avg_logp(y|x)) (per-token mean over the completion) and
log odds(y) = log(p / (1 - p)) = avg_logp - log(1 - exp(avg_logp)), one stage does SFT and preference
learning together: L = NLL(y_w) + lambda * -log sigma(log odds(y_w) - log odds(y_l)). No reference model.
Default lambda 0.1 (Mistral-ORPO-beta; TRL's `ORPOConfig.beta`). log(1 - exp(x)) is computed stably on
both sides of x = -log 2 and with x clamped to <= -1e-6, so a response the model already assigns p ~ 1
gives a finite loss and gradients. Deviation from TRL: NLL(y_w) is each pair's own per-token mean of the
chosen response's NLL (the paper's per-example form), averaged over pairs with the step's `num_items`;
TRL takes one token mean over all chosen tokens in the batch, which weights long responses more and cannot
be split into gradient-accumulation micro-batches exactly.
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


class ORPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["orpo"] = "orpo"
    lam: float = Field(0.1, ge=0, description="weight lambda of the odds-ratio term (TRL's ORPOConfig.beta)")




def orpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, chosen_nll: torch.Tensor, *, lam: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pair losses [P] and metrics from mean per-token log-probs and the chosen responses' NLL [P]."""
    chosen, rejected = chosen_avg_logps.float(), rejected_avg_logps.float()
    odds_diff = log_odds(chosen) - log_odds(rejected)
    log_sig = F.logsigmoid(odds_diff)
    losses = chosen_nll - lam * log_sig
    metrics = pair_metrics(
        lam * chosen, lam * rejected, chosen, rejected, nll=chosen_nll, log_odds_ratio=odds_diff, or_loss=-log_sig
    )
    return losses, metrics




@OBJECTIVES.register("orpo")
class ORPO(Objective):
    """ORPO: SFT on the chosen response plus an odds-ratio preference term, no reference model."""

    Config = ORPOConfig
    batch_format = "pairwise"
    needs_reference = False

    def loss(self, model: Any, batch: Batch, num_items: int, ref: Reference | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg: ORPOConfig = self.cfg  # type: ignore[assignment]
        chosen, rejected = split_pairs(sequence_logps(model, batch).mean, int(batch["sample_ids"].numel()))
        losses, metrics = orpo_loss(chosen, rejected, -chosen, lam=cfg.lam)
        return losses.sum() / max(num_items, 1), metrics
