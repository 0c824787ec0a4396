"""Paired statistics for before/after comparisons, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from tunelab.evaluate.stats import compare_pass, mcnemar_exact, min_detectable, paired_bootstrap_ci


def test_mcnemar_exact_by_hand() -> None:
    # 5 fixed, 0 broken: two-sided binomial 2 * (1/2)^5 = 0.0625
    assert mcnemar_exact(5, 0) == pytest.approx(0.0625)
    # 3 fixed, 1 broken: 2 * P(X <= 1), X ~ Bin(4, 1/2) = 2 * 5/16 = 0.625
    assert mcnemar_exact(3, 1) == pytest.approx(0.625)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 3) == pytest.approx(0.0923, abs=1e-4)  # the recorded ORPO self-improvement result


def test_min_detectable() -> None:
    assert min_detectable(20) == 6  # 2 * 2^-6 = 0.031 < 0.05, 2 * 2^-5 = 0.0625 is not
    assert min_detectable(4) is None


def test_compare_pass_counts_and_verdicts() -> None:
    a = {str(i): i < 5 for i in range(40)}  # 5 of 40
    b = {str(i): i < 5 or 10 <= i < 20 for i in range(40)}  # 10 fixed, none broken
    r = compare_pass(a, b)
    assert (r.problems, r.fixed, r.broken) == (40, 10, 0)
    assert r.rate_a == 0.125 and r.rate_b == 0.375
    assert r.p_value == pytest.approx(2 * 0.5**10)
    assert r.ci_low > 0 and r.ci_low <= r.diff <= r.ci_high
    assert r.verdict().startswith("better (+0.250")
    same = compare_pass(a, dict(a))
    assert same.verdict().startswith("no detectable change (+0.000, p = 1;")
    assert "only a net change of >= 6 problems" in same.verdict()


def test_bootstrap_ci_is_seeded_and_brackets_the_difference() -> None:
    rng = np.random.default_rng(1)
    a = (rng.random(200) < 0.3).astype(float)
    b = (rng.random(200) < 0.5).astype(float)
    assert paired_bootstrap_ci(a, b) == paired_bootstrap_ci(a, b)
    lo, hi = paired_bootstrap_ci(a, b)
    assert lo < b.mean() - a.mean() < hi
