"""A run's before/after verdicts: did it get better, by how much, how sure.

- Each evaluation task scored before and after training: per problem, pass/fail (one sample) or the unbiased
  pass@1 estimate c/n (several), the exact McNemar / sign test on the problems that moved and a paired bootstrap
  CI of the pass@1 difference (`tunelab.evaluate.stats.compare_pass`).
- Validation loss: the same validation samples before and after, each scored alone (the first 500); a paired
  bootstrap over samples (each a (summed loss, items) pair; the statistic is the ratio of sums, i.e. the loss per
  token as trained) gives the CI and a two-sided bootstrap p-value. With fewer than 5 samples no verdict is
  claimed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.evaluate.stats import compare_pass, passed_per_problem

MIN_SAMPLES = 5


def loss_verdict(before: list[list[float]], after: list[list[float]], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if b.shape != a.shape or b.ndim != 2 or b.shape[1] != 2:
        raise ValueError("before and after must be the same validation samples: [[summed loss, items], ...]")
    diff = a[:, 0].sum() / a[:, 1].sum() - b[:, 0].sum() / b[:, 1].sum()
    n = len(b)
    out: dict[str, Any] = {"what": "validation loss", "before": b[:, 0].sum() / b[:, 1].sum(),
                           "after": a[:, 0].sum() / a[:, 1].sum(), "diff": float(diff), "units": n}
    if n < MIN_SAMPLES:
        out.update(p_value=None, ci_low=None, ci_high=None,
                   verdict=f"{diff:+.4f}; {n} validation samples are too few for a verdict (need >= {MIN_SAMPLES})")
        return out
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = a[idx, 0].sum(1) / a[idx, 1].sum(1) - b[idx, 0].sum(1) / b[idx, 1].sum(1)
    lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    p = float(min(1.0, 2 * min((boot >= 0).mean(), (boot <= 0).mean())))
    p_text = f"p < {1 / n_boot:.0e}" if p == 0 else f"p = {p:.2g}"
    if p < 0.05:
        word = "lower (better)" if diff < 0 else "higher (worse)"
        text = f"{word}: {diff:+.4f} (95% CI {lo:+.4f}..{hi:+.4f}, {p_text}; paired bootstrap over {n} validation samples)"
    else:
        text = f"no detectable change: {diff:+.4f} (95% CI {lo:+.4f}..{hi:+.4f}, {p_text}; {n} validation samples)"
    out.update(p_value=p, ci_low=lo, ci_high=hi, verdict=text)
    return out


def run_verdicts(run_dir: Path) -> list[dict[str, Any]]:
    """Every before/after comparison a finished run directory holds, each with a one-line `verdict`."""
    out: list[dict[str, Any]] = []
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        s = json.loads(summary_file.read_text())
        if s.get("val_samples_before") and s.get("val_samples_after"):
            out.append(loss_verdict(s["val_samples_before"], s["val_samples_after"]))
    for task_dir in sorted((run_dir / "eval").glob("*")):
        before, after = task_dir / "before" / "summary.json", task_dir / "after" / "summary.json"
        if not (before.is_file() and after.is_file()):
            continue
        r = compare_pass(passed_per_problem(json.loads(before.read_text())), passed_per_problem(json.loads(after.read_text())))
        out.append({"what": f"{task_dir.name} pass@1", **r.as_dict()})
    return out
