"""Preference pairs from judged samples: a passing sample is chosen, a failing one rejected, the reference
stands in where nothing passes (marked), problems with nothing to contrast are skipped and counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import MBPP_FILE, needs_mbpp

from tunelab.data.build_pairs import pairs_from_samples
from tunelab.evaluate.tasks import TASKS
from tunelab.evaluate.tasks._base import Problem

MBPP = MBPP_FILE


def _task(mode: str = "chat"):  # noqa: ANN202
    cfg = TASKS.parse({"name": "mbpp", "path": str(MBPP), "split": "train", "prompt_mode": mode}, "t")
    return TASKS.get("mbpp")(cfg, chat_template=True)  # type: ignore[attr-defined]


def _s(pid: str, i: int, text: str, passed: bool) -> dict:
    return {"problem_id": pid, "sample": i, "completion": text, "passed": passed}


def test_pairs_from_samples() -> None:
    task = _task()
    problems = [Problem(str(i), f"task {i}", reference=f"def f{i}():\n    return {i}", meta={"test_list": ["assert True"]}) for i in range(5)]
    samples = [
        _s("0", 0, "good0", True), _s("0", 1, "bad0", False), _s("0", 2, "bad0", False), _s("0", 3, "bad0b", False),
        _s("1", 0, "bad1", False), _s("1", 1, " ", False),  # nothing passes: the reference is chosen
        _s("2", 0, "good2", True), _s("2", 1, "good2b", True),  # nothing fails: no pair
        _s("3", 0, "", False),  # only an empty sample: nothing to reject
    ]
    rows, stats = pairs_from_samples(task, problems, samples, per_problem=2)
    assert [(r["problem_id"], r["chosen"], r["rejected"], r["chosen_source"]) for r in rows] == [
        ("0", "good0", "bad0", "sample"), ("0", "good0", "bad0b", "sample"),  # duplicates of a failure count once
        ("1", "```python\ndef f1():\n    return 1\n```", "bad1", "reference"),
    ]
    assert rows[0]["prompt"] == task.prompt(problems[0])
    assert stats == {"problems": 5, "all_pass": 1, "no_sample_passes": 1, "pairs_from_samples": 2, "pairs_with_reference": 1}
    rows, stats = pairs_from_samples(task, problems, samples, reference_chosen=False)
    assert [r["problem_id"] for r in rows] == ["0"] and stats["pairs_with_reference"] == 0


@needs_mbpp
def test_cli_build_pairs_smoke(tmp_path: Path) -> None:
    out = tmp_path / "pairs.jsonl"
    cmd = [str(Path(sys.executable).parent / "tunelab"), "data", "build-pairs", "tiny-llama", "--out", str(out), "--data", str(MBPP),
           "--k", "2", "--limit", "2", "--max-new-tokens", "8", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads(done.stdout)
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert stats["pairs"] == len(rows) == 2 and {r["chosen_source"] for r in rows} <= {"sample", "reference"}
    samples = tmp_path / "pairs_samples" / "eval" / "mbpp" / "samples" / "samples.jsonl"
    assert len(samples.read_text().splitlines()) == 4  # 2 problems x k=2, each judged in the sandbox
    bad = subprocess.run([*cmd[:6], "--data", str(tmp_path / "nope.jsonl")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "file not found" in bad.stderr and "Traceback" not in bad.stderr
