"""RRHF (Yuan et al., "RRHF: Rank Responses to Align Language Models with Human Feedback without tears",
arXiv 2304.05302): each query comes with k scored responses; the length-normalised log-likelihood
p_i = sum_t log pi(y_i,t | x, y_i,<t) / |y_i|^alpha must follow the scores, via the hinge
L_rank = sum over pairs with score_i < score_j of max(0, p_i - p_j), plus L_ft, the mean-token NLL of the
best-scored response (ties: the first); per query L = rank_weight * L_rank + L_ft. No reference model.
Defaults: length_penalty alpha 1.0 and rank_weight 1.0, the value the authors' shipped `train.sh` passes
(their dataclass default is 100). Deviations from the reference code (GanjinZero/RRHF `train.py`): L_ft is
the mean over the best response's label tokens (theirs averages over the padded row, counting padding as
zero), queries may have different numbers of responses, and the loss is summed over queries and divided by
the step's query count (theirs trains one query per micro-batch).
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


class RRHFConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["rrhf"] = "rrhf"
    length_penalty: float = Field(1.0, ge=0, description="alpha in p_i = sum log-prob / length**alpha")
    rank_weight: float = Field(
        1.0, ge=0, description="weight of the ranking hinge (shipped train.sh: 1; reference dataclass default: 100)"
    )


def _best_of_unit(scores: torch.Tensor, seq_unit: torch.Tensor, num_units: int) -> torch.Tensor:
    """Index [U] of each unit's highest-scored sequence (the first one on ties)."""
    top = torch.full((num_units,), -torch.inf, dtype=scores.dtype, device=scores.device)
    top = top.scatter_reduce(0, seq_unit, scores, reduce="amax")
    idx = torch.arange(scores.numel(), device=scores.device)
    cand = torch.where(scores == top[seq_unit], idx, scores.numel())
    first = torch.full((num_units,), scores.numel(), dtype=torch.long, device=scores.device)
    return first.scatter_reduce(0, seq_unit, cand, reduce="amin")


def rrhf_loss(
    seq_logps_sum: torch.Tensor,
    seq_lengths: torch.Tensor,
    scores: torch.Tensor,
    seq_unit: torch.Tensor,
    *,
    length_penalty: float = 1.0,
    rank_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-unit RRHF losses [U] from per-sequence summed log-probs, label-token counts, scores and units [S]."""
    num_units = int(seq_unit.max()) + 1
    lengths = seq_lengths.to(seq_logps_sum.dtype).clamp(min=1)
    p = seq_logps_sum / lengths**length_penalty
    # pairs (i, j) of the same unit where i is scored strictly below j: penalise p_i > p_j
    ordered = (seq_unit[:, None] == seq_unit[None, :]) & (scores[:, None] < scores[None, :])
    hinge = torch.relu(p[:, None] - p[None, :]) * ordered
    rank = torch.zeros(num_units, dtype=p.dtype, device=p.device).index_add(0, seq_unit, hinge.sum(1))
    best = _best_of_unit(scores, seq_unit, num_units)
    nll = -seq_logps_sum[best] / lengths[best]
    losses = rank_weight * rank + nll
    metrics = {"rank": float(rank.detach().mean()), "nll": float(nll.detach().mean())}
    if bool(ordered.any()):
        correct = (p[:, None] < p[None, :])[ordered]
        metrics["rewards/accuracy"] = float(correct.float().mean())
    return losses, metrics


@OBJECTIVES.register("rrhf")
class RRHF(Objective):
    """RRHF: k scored responses per prompt; ranking hinge on length-normalised log-probs + SFT on the best."""

    Config = RRHFConfig
    batch_format = "ranked"

    def loss(self, model: Any, batch: Batch, num_items: int, ref: Reference | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg: RRHFConfig = self.cfg  # type: ignore[assignment]
        lp = sequence_logps(model, batch)
        losses, metrics = rrhf_loss(
            lp.sum,
            lp.count,
            batch["scores"],
            batch["seq_unit"],
            length_penalty=cfg.length_penalty,
            rank_weight=cfg.rank_weight,
        )
        return losses.sum() / max(num_items, 1), metrics
