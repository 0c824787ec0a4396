"""KTO, Kahneman-Tversky Optimization (Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic
Optimization", arXiv 2402.01306): alignment from unpaired desirable / undesirable completions. With the
implied reward r = log pi(y|x) - log pi_ref(y|x) and the reference point z0 = max(0, KL estimate), not
back-propagated, the loss of a desirable completion is w_D * (1 - sigma(beta (r - z0))) and of an undesirable
one w_U * (1 - sigma(beta (z0 - r))) (paper eq. 7-8). z0 is estimated as in the paper and TRL's KTOTrainer:
the mean over the micro-batch of the policy-minus-reference log-ratio of mismatched pairs (each prompt with
another sample's completion, the batch's `kl_completion` sequences). Defaults: beta 0.1, both weights 1.0
(the paper advises w_D n_D / (w_U n_U) in [1, 4/3] when classes are unbalanced). Deviations: the KL estimate is
a statistic of the micro-batch on one process (TRL additionally averages it across processes), so this loss is
not accumulation-invariant (`accumulation_invariant = False`: k micro-batches give k estimates, not one of
the whole step); the completion and KL sequences share one forward pass, the KL half detached.
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


class KTOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0, description="temperature of the implied reward beta * log(pi / pi_ref)")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D, weight of desirable examples' losses")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U, weight of undesirable examples' losses")


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """Batch KL estimate: mean of policy - reference log-probs of the mismatched completions (detached)."""
    return (policy_kl_logps.detach() - ref_kl_logps.detach()).mean()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_estimate: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-unit KTO losses [U] from summed completion log-probs [U] and the `desirable` flags [U] (bool)."""
    desirable = desirable.to(torch.bool)
    z0 = torch.as_tensor(kl_estimate, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    r = policy_logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    rewards = beta * r.detach()
    metrics = {"kl": float(z0)}
    for key, sel in (("chosen", desirable), ("rejected", ~desirable)):
        if bool(sel.any()):  # a micro-batch may hold only one class: skip the key rather than log NaN
            metrics[f"rewards/{key}"] = float(rewards[sel].mean())
            metrics[f"logps/{key}"] = float(policy_logps.detach()[sel].mean())
    return losses, metrics


@OBJECTIVES.register("kto")
class KTO(Objective):
    """KTO: unpaired desirable/undesirable completions against a reference, prospect-theoretic loss."""

    Config = KTOConfig
    batch_format = "unpaired"
    needs_reference = True
    # the reference point z0 is a micro-batch statistic (as in the paper and TRL), so accumulating k
    # micro-batches is not the same as one batch k times larger
    accumulation_invariant = False

    def loss(self, model: Any, batch: Batch, num_items: int, ref: Reference | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        if ref is None:
            raise ValueError("kto needs reference log-probs: the loop must pass `ref`")
        cfg: KTOConfig = self.cfg  # type: ignore[assignment]
        pol = sequence_logps(model, batch).sum  # [completion, kl_completion] per unit
        ref_lp = ref.logps(model, batch).sum
        kl = kto_kl_estimate(pol[1::2], ref_lp[1::2])
        losses, metrics = kto_loss(
            pol[0::2],
            ref_lp[0::2],
            batch["desirable"],
            kl,
            beta=cfg.beta,
            desirable_weight=cfg.desirable_weight,
            undesirable_weight=cfg.undesirable_weight,
        )
        return losses.sum() / max(num_items, 1), metrics
