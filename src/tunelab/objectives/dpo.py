"""DPO and its pairwise variants: "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model" (Rafailov et al., arXiv 2305.18290). With the log-ratio margin
h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)] over summed completion
log-probs, `sigmoid` is DPO's L = -log sigma(beta h); `ipo` is IPO (Azar et al., arXiv 2310.12036)
L = (h - 1/(2 beta))^2, where beta plays the paper's tau; `cdpo` is conservative DPO (Mitchell's note on
label noise) L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h); `robust` is robust DPO (Chowdhury
et al. 2024, arXiv 2403.00409) L = [(1 - eps) L_dpo(h) - eps L_dpo(-h)] / (1 - 2 eps), eps in [0, 0.5), an
unbiased estimate of the clean-label loss; `hinge` is L = relu(1 - beta h) (SLiC-style). Defaults: beta 0.1,
variant sigmoid, label_smoothing (eps) 0. Deviations: for `ipo` the objective feeds length-normalised
(per-token mean) log-probs to the loss, as TRL does and as the IPO authors confirmed to TRL (the paper's
tau values assume it), so the ipo rewards/logps metrics are per-token too; TRL's DPO `sigmoid` ignores
label smoothing, so label-smoothed DPO is the separate `cdpo` variant here, and a non-zero label_smoothing
with sigmoid/ipo/hinge is rejected rather than silently ignored.

`online` makes it online DPO: the pairs come from the policy's own samples drawn during training every `every`
steps and judged by execution (see objectives/_online.py and train/rollouts.py), with the reference model being
the base weights (the adapter switched off), as in online/iterative DPO where pi_ref stays the initial policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.objectives import OBJECTIVES
from tunelab.objectives._base import Batch, Objective
from tunelab.objectives._logprobs import SeqLogps, sequence_logps
from tunelab.objectives._online import OnlineConfig
from tunelab.objectives._pairwise import pair_metrics, split_pairs

if TYPE_CHECKING:
    from tunelab.evaluate.tasks._base import Problem, Task
    from tunelab.train.reference import Reference

Variant = Literal["sigmoid", "ipo", "cdpo", "robust", "hinge"]
VARIANTS: tuple[str, ...] = ("sigmoid", "ipo", "cdpo", "robust", "hinge")
SMOOTHED: tuple[str, ...] = ("cdpo", "robust")


class DPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["dpo"] = "dpo"
    variant: Variant = Field(
        "sigmoid",
        description="sigmoid (DPO), ipo (IPO, length-normalised), cdpo (conservative DPO), "
        "robust (robust DPO, Chowdhury et al.), hinge (relu(1 - beta h))",
    )
    beta: float = Field(0.1, gt=0, description="inverse temperature / KL strength (IPO's tau)")
    label_smoothing: float = Field(
        0.0, ge=0, le=0.5, description="assumed label-flip rate eps, used only by cdpo (<= 0.5) and robust (< 0.5)"
    )
    online: OnlineConfig | None = Field(
        None, description="train on pairs from the model's own samples, judged by a code task, drawn every N steps "
        "during training (online DPO; objectives/_online.py); data.train is then not used")

    @model_validator(mode="after")
    def _check_smoothing(self) -> DPOConfig:
        eps = self.label_smoothing
        if eps > 0 and self.variant not in SMOOTHED:
            raise ValueError(
                f"label_smoothing={eps} has no effect with variant '{self.variant}': use variant 'cdpo' "
                "(conservative, label-smoothed DPO) or 'robust' (unbiased robust DPO), or set label_smoothing to 0"
            )
        if self.variant == "robust" and eps >= 0.5:
            raise ValueError("variant 'robust' needs label_smoothing < 0.5 (it divides by 1 - 2 * label_smoothing)")
        return self


def _check_eps(variant: str, eps: float) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown DPO variant '{variant}' (known: {', '.join(VARIANTS)})")
    if eps < 0 or (variant == "robust" and eps >= 0.5) or (variant == "cdpo" and eps > 0.5):
        raise ValueError(f"label_smoothing={eps} out of range for variant '{variant}'")
    if eps > 0 and variant not in SMOOTHED:
        raise ValueError(f"label_smoothing is only used by variants cdpo and robust, not '{variant}'")


def _per_pair(h: torch.Tensor, beta: float, variant: str, eps: float) -> torch.Tensor:
    z = beta * h
    if variant == "sigmoid":
        return -F.logsigmoid(z)
    if variant == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if variant == "cdpo":
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if variant == "robust":
        return ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    return torch.relu(1 - z)  # hinge


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    variant: str,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pair losses [P] and metrics from policy/reference log-probs of chosen and rejected responses.

    Pass summed completion log-probs for every variant except `ipo`, which expects length-normalised
    (per-token mean) log-probs for policy and reference alike (TRL's choice, confirmed by the IPO authors).
    """
    _check_eps(variant, label_smoothing)
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    losses = _per_pair(chosen_ratio - rejected_ratio, beta, variant, label_smoothing)
    return losses, pair_metrics(
        beta * chosen_ratio, beta * rejected_ratio, policy_chosen_logps, policy_rejected_logps
    )




@OBJECTIVES.register("dpo")
class DPO(Objective):
    """DPO and variants (sigmoid, ipo, cdpo, robust, hinge): preference pairs against a reference model."""

    Config = DPOConfig
    batch_format = "pairwise"
    needs_reference = True

    def loss(self, model: Any, batch: Batch, num_items: int, ref: Reference | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        if ref is None:
            raise ValueError("objective 'dpo' needs reference log-probs: pass `ref` (the run's Reference)")
        cfg: DPOConfig = self.cfg  # type: ignore[assignment]
        policy, reference = sequence_logps(model, batch), ref.logps(model, batch)
        pc, pr, rc, rr = self._inputs(policy, reference, int(batch["sample_ids"].numel()))
        losses, metrics = dpo_loss(
            pc, pr, rc, rr, beta=cfg.beta, variant=cfg.variant, label_smoothing=cfg.label_smoothing
        )
        return losses.sum() / max(num_items, 1), metrics

    @property
    def online(self) -> OnlineConfig | None:
        return self.cfg.online  # type: ignore[attr-defined]

    def rollout_rows(self, task: Task, problems: list[Problem], samples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """A passing sample as chosen, a failing one as rejected (the reference solution where none passes)."""
        from tunelab.data.build_pairs import pairs_from_samples

        spec: OnlineConfig = self.cfg.online  # type: ignore[attr-defined]
        return pairs_from_samples(task, problems, samples, per_problem=spec.per_problem, reference_chosen=spec.reference_chosen)

    def _inputs(self, policy: SeqLogps, reference: SeqLogps, num_pairs: int) -> tuple[torch.Tensor, ...]:
        """(policy chosen, policy rejected, ref chosen, ref rejected): summed, or per-token means for ipo."""
        mean = self.cfg.variant == "ipo"  # type: ignore[attr-defined]
        pol = policy.mean if mean else policy.sum
        # normalise the reference by the policy's token counts: same sequences, so only one source of lengths
        refl = reference.sum / policy.count.clamp(min=1) if mean else reference.sum
        return (*split_pairs(pol, num_pairs), *split_pairs(refl, num_pairs))
