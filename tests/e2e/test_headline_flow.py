"""The README's headline flow, as a user runs it: `tunelab train` with eval tasks -> before and after
evaluation -> the numbers in summary.json, in the CLI's closing table (with verdicts) and in the report's
verdict and evaluation sections, all the same numbers, and no report section that failed to render."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

TUNELAB = str(Path(sys.executable).parent / "tunelab")


def test_train_with_eval_tasks_reports_the_same_numbers_everywhere(tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = subprocess.run(
        [TUNELAB, "train", str(REPO / "configs" / "tiny" / "sft_lora.yaml"), "--out", str(run), "train.max_steps=3",
         "train.save_every=0", "data.valid_size=0.3",
         "eval.tasks=[{name: humaneval, limit: 3, max_new_tokens: 16}, "
         "{name: codetasks, path: 'builtin:code_instructions', skip: 196, max_new_tokens: 16}]"],
        capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    html = (run / "report.html").read_text()
    assert "could not render" not in html
    verdicts = {v["what"]: v for v in summary["verdicts"]}
    assert set(verdicts) == {"validation loss", "humaneval pass@1", "codetasks pass@1"}
    for task, n in (("humaneval", 3), ("codetasks", 4)):
        scores = {label: json.loads((run / "eval" / task / label / "summary.json").read_text()) for label in ("before", "after")}
        assert all(s["n_problems"] == n and s["n_samples"] == 1 for s in scores.values())
        before, after = scores["before"]["metrics"]["pass@1"], scores["after"]["metrics"]["pass@1"]
        v = verdicts[f"{task} pass@1"]
        assert (v["rate_a"], v["rate_b"], v["problems"]) == (before, after, n)
        # the CLI's closing table: the before -> after row and the verdict row, with the same numbers
        assert re.search(rf"eval {task}\s+│ before pass@1 {before:.3f} -> after pass@1 {after:.3f}", p.stdout), p.stdout
        assert f"verdict: {task} pass@1" in p.stdout
        # the report: the verdict table's row, and the evaluation section's task block
        assert f"<th scope=\"row\">{task} pass@1</th><td class=\"num\">{before:.4f}</td><td class=\"num\">{after:.4f}</td>" in html
        assert f"<h3>{task}</h3>" in html
    loss = verdicts["validation loss"]
    # the verdict scores each validation sample alone; the summary's loss comes from packed batches: equal up to
    # float rounding of the two layouts
    assert abs(loss["before"] - summary["val_loss_before"]) < 1e-5 and abs(loss["after"] - summary["val_loss_after"]) < 1e-5
    assert f"{summary['val_loss_before']:.4f} -> {summary['val_loss_after']:.4f}" in p.stdout
