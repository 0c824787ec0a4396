"""LeTI feedback rows from the model's own samples, judged by execution (arXiv 2305.10314).

One iteration of LeTI's data loop: sample k programs per training problem from the model being tuned, run
each against the problem's tests in the sandbox, and write one row per sample for batch format "feedback":
`prompt` (the task's prompt text; the user message content for single-turn chat prompts, the messages
themselves otherwise), `attempt` (the completion), `reward` (passed all tests) and `feedback` (the sandbox's
verdict, "<status>: <reason>", e.g. "failed: assertion failed at line 4: ...", empty when the sample passed
or with `coarse`, the paper's binary-feedback ablation). Every sample is kept, duplicates included (they are
the model's distribution); empty completions (nothing to learn) and `sandbox_error` samples (never run, so
their verdict says nothing about the program) are skipped and counted. The paper's MBPP-specific hint about
extra code after the first function is not added.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from tunelab.data._judged import sample_and_judge, write_rows
from tunelab.errors import UserError
from tunelab.evaluate.tasks._base import Problem, Prompt, Task


def prompt_text(prompt: Prompt) -> Prompt:
    """A task prompt as a row's `prompt`: plain text, or the user message's content for a single-turn chat."""
    if isinstance(prompt, list) and len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return prompt


def feedback_text(status: str, reason: str) -> str:
    """What the sandbox said about a failing sample: "<status>: <reason>" (just the status without a reason)."""
    reason = reason.strip()
    return f"{status}: {reason}" if reason else status


def rows_from_samples(
    task: Task, problems: list[Problem], samples: list[dict[str, Any]], *, coarse: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows {prompt, attempt, reward, feedback, problem_id, sample, status}, problem by problem, and counts."""
    by_problem: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        by_problem[s["problem_id"]].append(s)
    rows: list[dict[str, Any]] = []
    stats = {"problems": len(problems), "samples": 0, "good": 0, "bad": 0, "skipped_empty": 0,
             "skipped_sandbox_error": 0, "problems_all_pass": 0, "problems_none_pass": 0}
    for p in problems:
        got = sorted(by_problem.get(p.id, []), key=lambda s: s["sample"])
        stats["samples"] += len(got)
        if got:
            passed = sum(bool(s["passed"]) for s in got)
            stats["problems_all_pass"] += passed == len(got)
            stats["problems_none_pass"] += passed == 0
        prompt = prompt_text(task.prompt(p))
        for s in got:
            if s["status"] == "sandbox_error":
                stats["skipped_sandbox_error"] += 1
                continue
            if not s["completion"].strip():
                stats["skipped_empty"] += 1
                continue
            good = bool(s["passed"])
            feedback = "" if good or coarse else feedback_text(s["status"], s.get("reason") or "")
            rows.append({"prompt": prompt, "attempt": s["completion"], "reward": good, "feedback": feedback,
                         "problem_id": p.id, "sample": s["sample"], "status": s["status"]})
            stats["good" if good else "bad"] += 1
    return rows, stats


def build_feedback(
    model: Any, tok: Any, task_cfg: Any, out: Path, *, batch_size: int = 16, coarse: bool = False, quiet: bool = False,
) -> dict[str, Any]:
    """Sample with the task's settings (n_samples, temperature), judge in the sandbox, write the feedback JSONL."""
    task, samples, summary, path = sample_and_judge(model, tok, task_cfg, out, command="feedback", batch_size=batch_size, quiet=quiet)
    rows, stats = rows_from_samples(task, task.problems(), samples, coarse=coarse)
    if not rows:
        raise UserError(f"data feedback: no rows (every sample was empty or not run: {stats}); see {path}")
    write_rows(rows, out)
    return {**stats, "rows": len(rows), "coarse": coarse, "sample_pass_at_1": summary["metrics"].get("pass@1"),
            "samples_dir": str(path.parents[3]), "out": str(out)}
