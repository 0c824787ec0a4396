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


def test_several_samples_per_problem_compare_pass1_estimates_not_any_pass() -> None:
    from tunelab.evaluate.stats import passed_per_problem

    # 4 problems x 5 samples. Before: 1/5 on every problem; after: 4/5 on problems 0-2, 0/5 on problem 3.
    before = {"per_problem": {str(i): {"passed": 1, "n": 5} for i in range(4)}}
    after = {"per_problem": {**{str(i): {"passed": 4, "n": 5} for i in range(3)}, "3": {"passed": 0, "n": 5}}}
    a, b = passed_per_problem(before), passed_per_problem(after)
    assert a == {str(i): 0.2 for i in range(4)}  # "any sample passed" would say 1.0: pass@5, not pass@1
    r = compare_pass(a, b)
    assert r.rate_a == pytest.approx(0.2) and r.rate_b == pytest.approx(0.6)  # (0.8 * 3 + 0) / 4
    assert (r.fixed, r.broken) == (3, 1)  # problems up vs down
    assert r.p_value == pytest.approx(0.625)  # the sign test: 2 * P(X <= 1), X ~ Bin(4, 1/2)
    one_sample = {"per_problem": {"x": {"passed": 1, "n": 1}, "y": {"passed": 0, "n": 1}}}
    assert passed_per_problem(one_sample) == {"x": 1.0, "y": 0.0}  # with one sample: pass/fail as before
