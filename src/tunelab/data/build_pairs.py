"""Preference pairs from the model's own samples, judged by execution.

The on-policy data recipe of LeTI (arXiv 2305.10314), SelfCodeAlign (arXiv 2410.24198) and "Preference
Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy Data" (arXiv 2404.14367): sample k programs per
training problem from the model being tuned, run each against the problem's tests in the sandbox, and pair a
passing sample (chosen) with a failing one (rejected). Where no sample passes, the dataset's reference
solution can stand in as chosen (`reference_chosen`), which keeps the hard problems (the ones with the
most to learn) instead of dropping them; such pairs are marked `chosen_source: reference`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from tunelab.data._judged import sample_and_judge, write_rows
from tunelab.errors import UserError
from tunelab.evaluate.tasks._base import Problem, Task


def reference_completion(task: Task, problem: Problem) -> str | None:
    """The reference solution written the way the model's completions are (a fenced block in chat mode)."""
    if not problem.reference:
        return None
    code = problem.reference.strip("\n")
    return f"```python\n{code}\n```" if task.mode == "chat" else code


def pairs_from_samples(
    task: Task, problems: list[Problem], samples: list[dict[str, Any]], *, per_problem: int = 1, reference_chosen: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows {prompt, chosen, rejected, problem_id, chosen_source} and counts of what happened per problem."""
    by_problem: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        by_problem[s["problem_id"]].append(s)
    rows: list[dict[str, Any]] = []
    stats = {"problems": len(problems), "all_pass": 0, "no_sample_passes": 0, "pairs_from_samples": 0, "pairs_with_reference": 0}
    for p in problems:
        got = sorted(by_problem.get(p.id, []), key=lambda s: s["sample"])
        good = list(dict.fromkeys(s["completion"] for s in got if s["passed"]))
        bad = list(dict.fromkeys(s["completion"] for s in got if not s["passed"] and s["completion"].strip()))
        if not bad:
            stats["all_pass"] += bool(good)
            continue
        source = "sample"
        if not good:
            stats["no_sample_passes"] += 1
            ref = reference_completion(task, p) if reference_chosen else None
            if ref is None:
                continue
            good, source = [ref], "reference"
        prompt = task.prompt(p)
        for i in range(min(per_problem, len(bad))):
            rows.append({"prompt": prompt, "chosen": good[i % len(good)], "rejected": bad[i], "problem_id": p.id, "chosen_source": source})
            stats["pairs_from_samples" if source == "sample" else "pairs_with_reference"] += 1
    return rows, stats


def build_pairs(
    model: Any, tok: Any, task_cfg: Any, out: Path, *, batch_size: int = 16, per_problem: int = 1,
    reference_chosen: bool = True, quiet: bool = False,
) -> dict[str, Any]:
    """Sample with the task's settings (n_samples, temperature), judge in the sandbox, write the pairs JSONL."""
    task, samples, summary, path = sample_and_judge(model, tok, task_cfg, out, command="build-pairs", batch_size=batch_size, quiet=quiet)
    rows, stats = pairs_from_samples(task, task.problems(), samples, per_problem=per_problem, reference_chosen=reference_chosen)
    if not rows:
        raise UserError(f"data build-pairs: no pairs (every problem's samples all passed or all were empty: {stats}); sample more (--k) or at a higher temperature")
    write_rows(rows, out)
    return {**stats, "pairs": len(rows), "sample_pass_at_1": summary["metrics"].get("pass@1"), "samples_dir": str(path.parents[3]), "out": str(out)}
