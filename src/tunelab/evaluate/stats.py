"""Paired comparisons of two models on the same problems: is the difference more than noise?

- Pass/fail per problem (pass@1 with one sample): the exact McNemar test, i.e. a two-sided binomial test on the
  discordant problems (fixed vs broken) with p = 1/2 (scipy.stats.binomtest), and a paired bootstrap confidence
  interval of the pass-rate difference (problems resampled with replacement, seeded).
- Several samples per problem: each problem's unbiased pass@1 estimate is its pass fraction c/n. The test is the
  exact sign test on the problems whose estimate went up vs down (ties dropped), which is McNemar's test when
  n = 1, and the CI is the paired bootstrap of the mean difference. (Counting a problem as passed when any of its
  n samples passed would measure pass@n and call it pass@1.)
- With n problems and no discordance the test cannot reject; `min_detectable` says how many net fixed problems
  (all discordant in one direction) a 0.05-level test would need, which is the honest wording of "no change".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class PairedResult:
    problems: int
    rate_a: float
    rate_b: float
    fixed: int  # problems that pass more often with b (with one sample: passed with b, failed with a)
    broken: int  # problems that pass more often with a
    p_value: float
    ci_low: float  # 95% CI of rate_b - rate_a
    ci_high: float

    @property
    def diff(self) -> float:
        return self.rate_b - self.rate_a

    def verdict(self, alpha: float = 0.05) -> str:
        if self.p_value < alpha:
            word = "better" if self.diff > 0 else "worse"
            return f"{word} ({self.diff:+.3f}, 95% CI {self.ci_low:+.3f}..{self.ci_high:+.3f}, p = {self.p_value:.3g})"
        need = min_detectable(self.problems, alpha)
        reach = f"with {self.problems} problems only a net change of >= {need} problems could be detected" if need else (
            f"{self.problems} problems are too few to detect any change")
        return f"no detectable change ({self.diff:+.3f}, p = {self.p_value:.2g}; {reach})"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "diff": self.diff, "verdict": self.verdict()}


def mcnemar_exact(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value (binomial test on the discordant pairs)."""
    from scipy.stats import binomtest

    n = fixed + broken
    return 1.0 if n == 0 else float(binomtest(fixed, n, 0.5, alternative="two-sided").pvalue)


def min_detectable(problems: int, alpha: float = 0.05) -> int | None:
    """Smallest k such that k fixed and 0 broken problems give p < alpha (None if even all problems cannot)."""
    for k in range(1, problems + 1):
        if mcnemar_exact(k, 0) < alpha:
            return k
    return None


def paired_bootstrap_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean(b) - mean(a) over problems resampled with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    diffs = b[idx].mean(axis=1) - a[idx].mean(axis=1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def compare_pass(a: dict[str, float], b: dict[str, float], seed: int = 0) -> PairedResult:
    """Model a vs model b on the problems both were scored on (per-problem pass@1 estimate: 0/1 with one sample)."""
    ids = sorted(set(a) & set(b))
    if not ids:
        raise ValueError("no problem was scored for both models")
    xa = np.array([float(a[i]) for i in ids])
    xb = np.array([float(b[i]) for i in ids])
    fixed = int((xb > xa).sum())
    broken = int((xa > xb).sum())
    lo, hi = paired_bootstrap_ci(xa, xb, seed=seed)
    return PairedResult(len(ids), float(xa.mean()), float(xb.mean()), fixed, broken, mcnemar_exact(fixed, broken), lo, hi)


def passed_per_problem(summary: dict[str, Any]) -> dict[str, float]:
    """An eval summary.json's per-problem unbiased pass@1 estimates: passed samples / samples (0 or 1 with one)."""
    return {pid: r["passed"] / r["n"] for pid, r in summary["per_problem"].items()}
