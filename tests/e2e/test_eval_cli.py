"""`tunelab eval` in a subprocess: files written, reasons recorded, user mistakes are one-line exit-2 errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-c", "from tunelab.cli import main; main()"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # one torch thread: the tiny model gains nothing from more, and a busy 2-core box makes threads slower
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_eval_tiny_model_on_humaneval(tmp_path: Path) -> None:
    out = tmp_path / "e"
    r = _run("eval", "--model", "tiny-llama", "--task", "humaneval", "--limit", "3", "--max-new-tokens", "8",
             "--out", str(out), "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = out / "eval" / "humaneval" / "eval"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["task"] == "humaneval" and summary["label"] == "eval"
    assert summary["n_problems"] == 3 and summary["n_samples"] == 1
    assert set(summary["metrics"]) == {"pass@1"} and summary["metrics"]["pass@1"] == 0.0  # garbage fails
    assert set(summary["per_problem"]) == {"HumanEval/0", "HumanEval/1", "HumanEval/2"}
    assert summary["settings"]["decoding"] == "greedy" and summary["settings"]["backend"] == "hf"
    assert summary["isolation"]
    samples = [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3
    for s in samples:
        assert {"problem_id", "sample", "prompt", "completion", "program", "status", "passed", "reason"} <= set(s)
        assert s["passed"] is False and s["status"] != "passed" and s["reason"]
        assert "check(" in s["program"]
    assert "pass@1" in r.stdout and "samples.jsonl" in r.stdout


def test_eval_bad_task_is_one_line_exit_2(tmp_path: Path) -> None:
    r = _run("eval", "--model", "tiny-llama", "--task", "humanevl", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "humanevl" in lines[0] and "did you mean 'humaneval'" in lines[0]


def test_eval_option_the_task_does_not_take(tmp_path: Path) -> None:
    r = _run("eval", "tiny-llama", "--task", "humaneval", "--split", "test", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--split" in r.stderr
    r = _run("eval", "tiny-llama", "--task", "humaneval", "--n-samples", "5", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "temperature" in r.stderr
