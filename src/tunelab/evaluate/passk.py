"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

For one problem with `n` samples of which `c` are correct, the probability that at least one of `k`
samples drawn without replacement is correct is ``1 - C(n-c, k) / C(n, k)``. The binomials overflow
floats long before realistic n, so it is computed as the product
``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which equals the ratio term by term. pass@k of a benchmark is the
mean of the per-problem estimates. There is no unbiased estimate when n < k, so that is an error rather
than a silently clipped number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: `n` samples, `c` correct, `k` drawn."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n < 0 or not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0  # every draw of k samples contains a correct one
    if k == 1:
        return c / n  # the product telescopes to (n-c)/n; skip its rounding
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def _pairs(per_problem: Iterable[Any]) -> list[tuple[int, int]]:
    pairs: list[tuple[int, int]] = []
    for item in per_problem:
        if isinstance(item, Mapping):
            n, c = item["n"], item["c"]
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
            n, c = item
        else:
            raise TypeError(f"each problem must be (n, c) or {{'n': n, 'c': c}}, got {item!r}")
        pairs.append((n, c))
    return pairs


def aggregate(per_problem: Iterable[tuple[int, int] | Mapping[str, int]], ks: Iterable[int] = (1, 10, 100),
              *, skip_unavailable: bool = False) -> dict[str, float]:
    """Mean pass@k over problems, as ``{"pass@1": ..., "pass@10": ...}``.

    `per_problem` holds ``(n, c)`` pairs (or ``{"n": .., "c": ..}``). A k larger than some problem's n
    raises ValueError, unless `skip_unavailable` is set, in which case that k is left out of the result
    (what human-eval and bigcode do: report only the k every problem supports).
    """
    pairs = _pairs(per_problem)
    if not pairs:
        raise ValueError("no problems to aggregate")
    out: dict[str, float] = {}
    for k in ks:
        smallest = min(n for n, _ in pairs)
        if smallest < k:
            if skip_unavailable:
                continue
            raise ValueError(f"pass@{k} needs n >= {k} for every problem; the smallest n is {smallest}")
        # fsum: the mean of many values near 1.0 should not drift with the problem order.
        out[f"pass@{k}"] = math.fsum(pass_at_k(n, c, k) for n, c in pairs) / len(pairs)
    return out
