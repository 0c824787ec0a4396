"""pass@k: the stable product form must agree with the closed form 1 - C(n-c, k) / C(n, k)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from tunelab.evaluate.passk import aggregate, pass_at_k


def exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_matches_closed_form_on_a_grid() -> None:
    worst = 0.0
    for n in range(1, 61):
        for c in range(n + 1):
            for k in range(1, n + 1):
                worst = max(worst, abs(pass_at_k(n, c, k) - float(exact(n, c, k))))
    assert worst < 1e-12


@pytest.mark.parametrize("n,c,k", [(200, 1, 100), (200, 13, 10), (200, 199, 1), (1000, 3, 500), (2000, 3, 1000),
                                   (500, 0, 250), (164, 50, 100)])
def test_matches_closed_form_for_large_n(n: int, c: int, k: int) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), rel=1e-12, abs=1e-15)


def test_pass_at_1_is_the_fraction_correct() -> None:
    for n in range(1, 50):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == c / n


def test_edges() -> None:
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 8) == 1.0  # n - c < k: every draw of 8 contains a correct sample
    assert pass_at_k(10, 1, 10) == 1.0
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(5, 2, 5) == 1.0
    # Monotone in c and in k.
    assert pass_at_k(20, 3, 5) < pass_at_k(20, 4, 5) < pass_at_k(20, 4, 6)


def test_errors() -> None:
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, -1, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 0)
    with pytest.raises(TypeError):
        pass_at_k(5.0, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pass_at_k(5, True, 1)


def test_aggregate_is_the_mean_over_problems() -> None:
    problems = [(10, 3), (10, 0), (10, 10), (10, 1)]
    out = aggregate(problems, ks=[1, 5, 10])
    assert set(out) == {"pass@1", "pass@5", "pass@10"}
    assert out["pass@1"] == pytest.approx((0.3 + 0 + 1 + 0.1) / 4)
    for k in (5, 10):
        assert out[f"pass@{k}"] == pytest.approx(sum(float(exact(n, c, k)) for n, c in problems) / 4)
    assert aggregate([{"n": 4, "c": 2}], ks=[1]) == {"pass@1": 0.5}


def test_aggregate_with_too_few_samples() -> None:
    with pytest.raises(ValueError, match="pass@10"):
        aggregate([(10, 1), (5, 1)], ks=[1, 10])
    assert aggregate([(10, 1), (5, 1)], ks=[1, 10], skip_unavailable=True) == {"pass@1": pytest.approx(0.15)}
    with pytest.raises(ValueError):
        aggregate([], ks=[1])
    with pytest.raises(TypeError):
        aggregate(["oops"], ks=[1])  # type: ignore[list-item]


def test_error_messages_name_the_argument_and_value() -> None:
    """Exact messages: a user reads them to fix a call (and a changed message is a changed contract)."""
    cases = [
        ((5.0, 1, 1), TypeError, "n must be an int, got float"),
        ((5, True, 1), TypeError, "c must be an int, got bool"),
        ((5, 1, "1"), TypeError, "k must be an int, got str"),
        ((5, 1, 0), ValueError, "k must be >= 1, got 0"),
        ((5, 6, 1), ValueError, "need 0 <= c <= n, got n=5, c=6"),
        ((-1, 0, 1), ValueError, "need 0 <= c <= n, got n=-1, c=0"),
        ((0, 0, 1), ValueError, "pass@1 needs at least 1 samples per problem, got n=0"),  # no samples: no estimate
    ]
    for args, exc, message in cases:
        with pytest.raises(exc) as err:
            pass_at_k(*args)  # type: ignore[arg-type]
        assert str(err.value) == message


def test_aggregate_errors_and_unordered_ks() -> None:
    with pytest.raises(ValueError) as err:
        aggregate([], ks=[1])
    assert str(err.value) == "no problems to aggregate"
    with pytest.raises(TypeError) as err:
        aggregate(["oops"], ks=[1])  # type: ignore[list-item]
    assert str(err.value) == "each problem must be (n, c) or {'n': n, 'c': c}, got 'oops'"
    with pytest.raises(TypeError, match="got \\(3, 1, 1\\)"):
        aggregate([(3, 1, 1)], ks=[1])  # type: ignore[list-item]
    # an unavailable k is skipped, and the ks after it are still computed
    assert aggregate([(4, 2)], ks=[10, 1, 4], skip_unavailable=True) == {"pass@1": 0.5, "pass@4": 1.0}
