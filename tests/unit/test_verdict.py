"""Before/after verdicts of a run: validation loss by a paired bootstrap over samples, pass rates by McNemar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.evaluate.verdict import loss_verdict, run_verdicts


def test_loss_verdict_lower_and_no_change() -> None:
    before = [[10.0, 10.0]] * 4 + [[12.0, 10.0]] * 4  # mean 1.1
    after = [[8.0, 10.0]] * 4 + [[10.0, 10.0]] * 4  # mean 0.9: every sample 0.2 lower
    v = loss_verdict(before, after)
    assert v["before"] == pytest.approx(1.1) and v["after"] == pytest.approx(0.9) and v["diff"] == pytest.approx(-0.2)
    assert v["ci_low"] == pytest.approx(-0.2) and v["ci_high"] == pytest.approx(-0.2)  # no spread: a point
    assert v["p_value"] == 0 and v["verdict"].startswith("lower (better): -0.2000")
    same = loss_verdict(before, before)
    assert same["verdict"].startswith("no detectable change: +0.0000") and same["p_value"] == 1.0


def test_loss_verdict_is_ratio_of_sums_and_needs_enough_samples() -> None:
    v = loss_verdict([[1.0, 1.0], [9.0, 9.0]], [[0.5, 1.0], [9.0, 9.0]])
    assert v["diff"] == pytest.approx(0.95 - 1.0)  # (0.5 + 9) / 10 - 1
    assert v["p_value"] is None and "too few for a verdict" in v["verdict"]
    with pytest.raises(ValueError, match="same validation samples"):
        loss_verdict([[1.0, 1.0]], [[1.0, 1.0], [2.0, 2.0]])


def test_run_verdicts_reads_a_run_directory(tmp_path: Path) -> None:
    rows = [[1.0, 1.0]] * 6
    (tmp_path / "summary.json").write_text(json.dumps({"val_samples_before": rows, "val_samples_after": rows}))
    for label, passed in (("before", [1, 0, 0, 0]), ("after", [1, 1, 1, 0])):
        d = tmp_path / "eval" / "humaneval" / label
        d.mkdir(parents=True)
        per = {f"HumanEval/{i}": {"passed": p, "n": 1} for i, p in enumerate(passed)}
        (d / "summary.json").write_text(json.dumps({"per_problem": per}))
    (tmp_path / "eval" / "mbpp" / "before").mkdir(parents=True)  # before only: nothing to compare
    out = run_verdicts(tmp_path)
    assert [v["what"] for v in out] == ["validation loss", "humaneval pass@1"]
    he = out[1]
    assert (he["fixed"], he["broken"], he["problems"]) == (2, 0, 4)
    assert he["verdict"].startswith("no detectable change (+0.500, p = 0.5; 4 problems are too few")
