"""Run report: fake run directories in tmp_path, no model. Checks content, escaping and partial-run robustness."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import tunelab
from tunelab.errors import UserError
from tunelab.report import write_report

SCRIPT = "<script>alert(1)</script>"
CONFIG = "model:\n  name: tiny-gpt <b>\nmethod:\n  name: lora\n  r: 8\nobjective:\n  name: sft\n"
_VOID = {"meta", "img", "br", "hr", "link", "input"}


class _TagChecker(HTMLParser):
    """Fails on a closing tag that does not match the open one; `stack` must end empty."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def _check_valid(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    checker = _TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert "could not render" not in page  # no section fell back to the error net
    assert f"tunelab {tunelab.__version__}" in page


def _write_jsonl(path: Path, rows: list[Any], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")


def _sample(pid: str, i: int, passed: bool, completion: str = "    return x", status: str = "") -> dict:
    status = status or ("passed" if passed else "failed")
    reason = "" if passed else "AssertionError: expected 3"
    return {
        "problem_id": pid,
        "sample": i,
        "prompt": f"def f_{i}(x):",
        "completion": completion,
        "program": "...",
        "status": status,
        "passed": passed,
        "reason": reason,
    }


def _eval(run: Path, task: str, label: str, metrics: dict, samples: list[dict]) -> None:
    per: dict[str, dict[str, int]] = {}
    for s in samples:
        p = per.setdefault(s["problem_id"], {"passed": 0, "n": 0})
        p["passed"] += s["passed"]
        p["n"] += 1
    summary = {
        "task": task,
        "label": label,
        "metrics": metrics,
        "n_problems": len(per),
        "n_samples": len(samples),
        "isolation": "subprocess",
        "per_problem": per,
    }
    (run / "eval" / task / label).mkdir(parents=True)
    (run / "eval" / task / label / "summary.json").write_text(json.dumps(summary))
    _write_jsonl(run / "eval" / task / label / "samples.jsonl", samples)


@pytest.fixture
def full_run(tmp_path: Path) -> Path:
    run = tmp_path / "run1"
    run.mkdir()
    (run / "config.yaml").write_text(CONFIG)
    train = [
        {
            "step": s,
            "epoch": s / 40,
            "loss": 2.0 - s / 40,
            "lr": 1e-4 * s / 40,
            "grad_norm": 1.0,
            "tokens_per_s": 900.0 + s,
            "tokens": 256 * s,
            "elapsed_s": s * 0.3,
            "rss_mb": 800.0,
        }
        for s in range(1, 41)
    ]
    val = [{"step": 0, "val_loss": 2.1}, {"step": 40, "val_loss": 1.4}]
    _write_jsonl(run / "metrics.jsonl", train + val, tail='{"step": 41, "loss": 1.')  # half-written line
    summary = {
        "trainable_params": 125_000,
        "total_params": 1_000_000,
        "steps": 40,
        "train_tokens": 10_240,
        "wall_s": 3725.5,
        "tokens_per_s": 920.4,
        "val_loss_before": 2.1,
        "val_loss_after": 1.6,
        "peak_rss_mb": 812.3,
        "final_dir": "runs/run1/final",
        "seed": 1234,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    p0, p1, p2 = "HumanEval/0", "HumanEval/1", "HumanEval/2"
    before = [
        _sample(p0, 0, False),
        _sample(p0, 1, False, status="timeout"),
        _sample(p1, 0, True, completion="    return 'was fine'"),
        _sample(p1, 1, True),
        _sample(p2, 0, True),
        _sample(p2, 1, False),
    ]
    after = [
        _sample(p0, 0, True, completion="    return 'now fixed'"),
        _sample(p0, 1, True),
        _sample(p1, 0, False, completion="    " + SCRIPT),
        _sample(p1, 1, False),
        _sample(p2, 0, True),
        _sample(p2, 1, False),
    ]
    _eval(run, "humaneval", "before", {"pass@1": 0.5, "pass@2": 0.6667}, before)
    _eval(run, "humaneval", "after", {"pass@1": 0.6, "pass@2": 0.8}, after)
    _eval(run, "humaneval", "step-20", {"pass@1": 0.55}, before)
    _eval(run, "humaneval", "step-5", {"pass@1": 0.51}, before)
    _eval(run, "squad", "eval", {"exact_match": 0.25, "rouge_l": 0.5}, [_sample("q1", 0, False)])
    return run


def test_full_report(full_run: Path) -> None:
    out = write_report(full_run)
    assert out == full_run / "report.html"
    page = out.read_text(encoding="utf-8")
    _check_valid(page)
    # header + config: names shown, user text escaped
    for text in ("tiny-gpt &lt;b&gt;", "lora", "sft", "r: 8"):
        assert text in page
    # three plots, each a real PNG
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 3
    assert all(base64.b64decode(u).startswith(b"\x89PNG\r\n\x1a\n") for u in uris)
    for title in ("Loss plot", "Learning rate plot", "Throughput plot"):
        assert title in page
    # key figures and other summary keys
    for text in (
        "12.50% of 1,000,000",
        "1h 02m 05s",
        "10,240",
        "920.4",
        "2.1000 -&gt; 1.6000 (delta -0.5000)",
        "812 MB",
        "final_dir",
        "runs/run1/final",
        "seed",
        "1,234",
    ):
        assert text in page, text
    # untrusted completion escaped
    assert SCRIPT not in page and "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_eval_tables_and_changes(full_run: Path) -> None:
    page = write_report(full_run).read_text(encoding="utf-8")
    humaneval, squad = page.split("<h3>humaneval</h3>")[1].split("<h3>squad</h3>")
    header = re.search(r"<thead>(.*?)</thead>", humaneval).group(1)
    assert re.findall(r"<th>([^<]*)</th>", header) == ["metric", "before", "step-5", "step-20", "after"]
    assert "pass@2" in humaneval and "0.6667" in humaneval and "subprocess" in humaneval
    # status counts per label: timeout only in before-like labels
    assert re.search(
        r'<th scope="row">timeout</th><td class="num">1</td><td class="num">1</td>'
        r'<td class="num">1</td><td class="num">0</td>',
        humaneval,
    )
    fixed, broken = humaneval.split("<h4>Fixed (1)</h4>")[1].split("<h4>Broken (1)</h4>")
    assert "HumanEval/0" in fixed and "HumanEval/1" not in fixed and "now fixed" in fixed
    assert "HumanEval/1" in broken and "HumanEval/0" not in broken and "was fine" in broken
    assert "&lt;script&gt;" in broken and "AssertionError: expected 3" in broken
    assert "HumanEval/2" not in fixed + broken  # unchanged 1/2 -> 1/2
    # standalone eval: other metric names, no before/after comparison
    assert "exact_match" in squad and "rouge_l" in squad and "Fixed" not in squad


def test_changes_from_samples_and_truncation(tmp_path: Path) -> None:
    long = "x" * 10_000
    for label, passed in (("before", True), ("after", False)):
        _eval(tmp_path, "t", label, {"pass@1": float(passed)}, [_sample("p", 0, passed, completion=long)])
        summary = tmp_path / "eval" / "t" / label / "summary.json"
        summary.write_text(json.dumps({"metrics": {"pass@1": float(passed)}}))  # no per_problem
    page = write_report(tmp_path).read_text(encoding="utf-8")
    _check_valid(page)
    assert "<h4>Broken (1)</h4>" in page and "1/1 -&gt; 0/1" in page
    assert "x" * 10_000 not in page and "truncated, 6000 more chars" in page


def test_empty_run_dir(tmp_path: Path) -> None:
    page = write_report(tmp_path).read_text(encoding="utf-8")
    _check_valid(page)
    assert "data:image/png" not in page
    assert "No summary.json yet" in page and "No config.yaml" in page and "No evaluation results" in page


def test_config_only(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    _check_valid(page)
    assert "tiny-gpt &lt;b&gt;" in page and "<pre>model:" in page
    assert "data:image/png" not in page


def test_malformed_inputs_do_not_crash(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    (tmp_path / "summary.json").write_text("[1, 2]")
    _write_jsonl(
        tmp_path / "metrics.jsonl",
        [[1], {"step": "x", "loss": "nan"}, {"step": 1, "loss": None}, {"step": 2, "val_loss": float("nan")}],
        tail="garbage\n",
    )
    label = tmp_path / "eval" / "t" / "before"
    label.mkdir(parents=True)
    (label / "summary.json").write_text(json.dumps({"metrics": [1], "per_problem": {"a": 3, "b": {"n": 0}}}))
    (tmp_path / "eval" / "t" / "after").mkdir()
    (tmp_path / "eval" / "empty_task").mkdir()
    (tmp_path / "eval" / "stray.txt").write_text("not a task")
    page = write_report(tmp_path).read_text(encoding="utf-8")
    _check_valid(page)
    assert "not a YAML mapping" in page and "No plottable metrics" in page and "data:image/png" not in page


def test_metrics_without_summary_plot_partial(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "val_loss": 2.0}])  # only one val point, no lr
    page = write_report(tmp_path).read_text(encoding="utf-8")
    _check_valid(page)
    assert page.count("data:image/png;base64,") == 1 and "Loss plot" in page


def test_missing_run_dir_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="run directory not found"):
        write_report(tmp_path / "nope")


def test_import_does_not_load_matplotlib() -> None:
    code = "import sys, tunelab.report; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_objective_metrics_get_their_own_plots(tmp_path: Path) -> None:
    from tunelab.report._plots import objective_plots

    rows = [{"step": s, "loss": 0.7 - s / 100, "rewards/chosen": s / 10, "rewards/rejected": -s / 10, "logps/chosen": -50.0 + s,
             "kl": 0.1} for s in range(1, 6)]
    plots = objective_plots(rows)
    assert [t for t, _ in plots] == ["Rewards", "Logps"]  # grouped by prefix; un-prefixed keys are not objective groups
    assert all(uri.startswith("data:image/png;base64,") for _, uri in plots)
    _write_jsonl(tmp_path / "metrics.jsonl", rows)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    _check_valid(page)
    assert "Rewards plot" in page and "Logps plot" in page
