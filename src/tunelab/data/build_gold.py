"""SFT data from an evaluation task's own problems and reference answers, in the prompt the task evaluates with.

Fine-tuning on a held-out part of a benchmark (Austin et al. 2021, arXiv 2108.07732, section 4: MBPP's 374
training problems) needs the training rows to look exactly like what evaluation will show the model; a
hand-written conversion drifts from the task's prompt (a different instruction, no few-shot prefix, a missing
end marker) and the measured effect is then partly a format effect. Here the task itself writes the rows:

- chat mode: `{"messages": [<the task's prompt turns>, {"role": "assistant", "content": <target>}]}`;
- plain modes (MBPP `fewshot`, HumanEval `completion`): `{"prompt": <the task's prompt text>, "completion":
  <target>}`, to be trained with `data.template: raw` so the tokens are the ones the evaluation prompt gives;

where the target is `Task.training_target` (the reference written as the model should answer in that mode, e.g.
few-shot MBPP code ending in "[DONE]"). Every row carries `problem_id` and `split`, so a test split used for
evaluation can be checked to be absent from the training file. Problems without a reference are skipped and
counted. No model is involved: this is a format conversion, deterministic for a given data file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.evaluate.tasks._base import Task


def gold_rows(task: Task, *, split: str | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One SFT row per problem of `task` that has a reference answer, and counts (`problems`, `rows`, `no_reference`)."""
    rows: list[dict[str, Any]] = []
    problems = task.problems()
    skipped = 0
    for p in problems:
        target = task.training_target(p)
        if target is None:
            skipped += 1
            continue
        prompt = task.prompt(p)
        row: dict[str, Any] = (
            {"prompt": prompt, "completion": target} if isinstance(prompt, str)
            else {"messages": [*map(dict, prompt), {"role": "assistant", "content": target}]}
        )
        row["problem_id"] = p.id
        if split is not None:
            row["split"] = split
        rows.append(row)
    return rows, {"problems": len(problems), "rows": len(rows), "no_reference": skipped}


def write_gold(tasks: list[tuple[str | None, Task]], out: Path) -> dict[str, Any]:
    """Rows of every (split, task) into one JSONL file, written atomically; per-split counts."""
    if not tasks:
        raise UserError("data gold: nothing to write (no split given)")
    modes = {t.mode for _, t in tasks}
    rows: list[dict[str, Any]] = []
    stats: dict[str, Any] = {"mode": modes.pop(), "splits": {}}
    for split, task in tasks:
        got, counts = gold_rows(task, split=split)
        rows += got
        stats["splits"][split or task.name] = counts
    if not rows:
        raise UserError("data gold: none of the selected problems has a reference answer; nothing written")
    ids = [(r.get("split"), r["problem_id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise UserError("data gold: the same split was given twice; each --split once")
    stats["rows"] = len(rows)
    stats["format"] = "messages" if "messages" in rows[0] else "prompt_completion"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    stats["out"] = str(out)
    return stats
