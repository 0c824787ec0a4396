"""Shared by the pairwise objectives (DPO, SimPO, ORPO, ASFT): splitting a batch's sequences into chosen and
rejected, the usual preference metrics, and numerically stable log-odds of a length-normalised likelihood."""

from __future__ import annotations

import math

import torch

#: average log-probs are clamped just below 0 so log(1 - p) stays finite; above it the odds terms give no gradient
MAX_AVG_LOGP = -1e-6


def split_pairs(x: torch.Tensor, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[chosen, rejected, chosen, rejected, ...] -> (chosen[P], rejected[P])."""
    if x.shape[0] != 2 * num_pairs:
        raise ValueError(f"pairwise batch has {x.shape[0]} sequences for {num_pairs} pairs (expected 2 per pair)")
    return x[0::2], x[1::2]


def pair_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
    **extra: torch.Tensor,
) -> dict[str, float]:
    """Means over the pairs of the usual preference metrics (+ `extra`), read back in one transfer."""
    with torch.no_grad():
        cr, rr = chosen_rewards.float(), rejected_rewards.float()
        stats = torch.stack([
            cr.mean(), rr.mean(), (cr > rr).float().mean(), (cr - rr).mean(),
            chosen_logps.float().mean(), rejected_logps.float().mean(), *(v.float().mean() for v in extra.values()),
        ])
    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected")
    return dict(zip((*names, *extra), stats.tolist(), strict=True))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0: log(-expm1(x)) near 0, log1p(-exp(x)) further out (each accurate there)."""
    x = x.clamp(max=MAX_AVG_LOGP)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(avg_logps)."""
    return avg_logps.clamp(max=MAX_AVG_LOGP) - log1mexp(avg_logps)
