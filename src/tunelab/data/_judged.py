"""Shared by the data builders that learn from the model's own judged samples (build_pairs, build_feedback):
sample with a code task's settings, judge every sample in the sandbox, and write JSONL rows atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.evaluate.tasks._base import Task


def sample_and_judge(model: Any, tok: Any, task_cfg: Any, out: Path, *, command: str, batch_size: int, quiet: bool) -> tuple[Task, list[dict[str, Any]], dict[str, Any], Path]:
    """(task, samples.jsonl rows, the evaluation summary, the samples file); samples kept beside `out`."""
    from tunelab.data.templating import has_chat_template
    from tunelab.evaluate.runner import evaluate_tasks
    from tunelab.evaluate.tasks import TASKS

    task: Task = TASKS.get(task_cfg.name)(task_cfg, chat_template=has_chat_template(tok))  # type: ignore[attr-defined]
    if not task.executes_code:
        raise UserError(f"data {command}: task '{task.name}' is not judged by execution; use a code task (mbpp, humaneval, codetasks)")
    work = out.with_name(out.stem + "_samples")
    summary = evaluate_tasks(model, tok, [task_cfg], work, "samples", batch_size=batch_size, quiet=quiet)[task.name]
    path = work / "eval" / task.name / "samples" / "samples.jsonl"
    samples = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return task, samples, summary, path


def write_rows(rows: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
