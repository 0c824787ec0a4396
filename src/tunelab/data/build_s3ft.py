"""S3FT training data: the model's own correct answers where it has them, else its restatement of the gold.

Selective Self-to-Supervised Fine-Tuning (Gupta et al., NAACL Findings 2025, arXiv 2502.08130) builds its
SFT set from the BASE model M (the one about to be tuned), per training pair (x, y):

1. yhat = M(x), greedy. If the task's judge accepts yhat, the target is yhat (source `model`).
2. Else M is asked to restate the gold answer y in its own words, given x and y (greedy). If the judge
   accepts that restatement, it is the target (source `paraphrase`).
3. Else the target is y itself (source `gold`; a fenced python block in chat mode, as
   `build_pairs.reference_completion` writes it).

The judge is the task's own: for code tasks (mbpp, humaneval, codetasks) the program runs against the
problem's tests in the sandbox; for text tasks (generation) the task's `pass_metric` (exact_match or
contains against the references). Training is then plain SFT on the written file, nothing else:
`objective: sft` with `data.train` = the rows this writes (`messages` format, user = the task's prompt,
assistant = the target; the loss is on the assistant turn). S3FT is a data-construction step + SFT.

Generation reuses the evaluation machinery: one `Engine`, and `evaluate.runner.run_task` for both passes
(the restate pass is the same task with its prompts replaced, so judging, stop strings and the sample
files are the task's own). Both passes' samples are kept next to the output in `<out stem>_s3ft/eval/`.

Deviations from the paper: the exact prompt the paper uses to ask for the paraphrase is not public (the
paper shows it only in outline), so `restate_prompt` is ours. The paper's MBPP prompt uses "[BEGIN] ...
[DONE]" code delimiters; here the task's own prompt is used (that delimiter form is MBPP's `fewshot` mode,
chat mode asks for a fenced block). For NQ/reading comprehension the paper judges with an LLM; here a text
task's own metric judges. Problems without a gold answer (codetasks ships none) keep the model's answer when
it is accepted and are skipped otherwise (counted in `no_gold_skipped`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tunelab.data.build_pairs import reference_completion
from tunelab.errors import UserError
from tunelab.evaluate.tasks._base import Problem, Prompt, Task

SOURCES = ("model", "paraphrase", "gold")
_CODE_ASK = (
    "Solve the task above again, in your own words and your own coding style: your code must stay correct (pass "
    "the same tests, keep the function name and signature), but do not copy the reference verbatim. Answer with "
    "the complete code in one ```python code block."
)
_TEXT_ASK = "Answer the question above again, restating this correct answer in your own words. Reply with the answer only."


def gold_answer(task: Task, problem: Problem) -> str | None:
    """The dataset's answer written as the model should write it (code: fenced in chat mode), or None."""
    if task.executes_code:
        return reference_completion(task, problem)
    return problem.references[0] if problem.references else None


def restate_prompt(original: Prompt, gold: str, *, code: bool) -> Prompt:
    """The task's prompt with the gold answer shown and a request to restate it in the model's own words.

    Ours: the paper's paraphrasing prompt is not public. Chat prompts get the reference and the request
    appended to the last user turn; plain-text prompts (few-shot / completion mode) get the reference
    before the prompt, so the text still ends where the model starts its answer.
    """
    if isinstance(original, str):
        return (f"A correct answer to the last problem below is:\n\n{gold}\n\n"
                "Write your own answer to that problem, in your own words.\n\n" + original)
    messages = [dict(m) for m in original]
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last]["content"] = (f"{messages[last]['content']}\n\nHere is a correct reference answer:\n\n{gold}\n\n"
                                 + (_CODE_ASK if code else _TEXT_ASK))
    return messages


def restate_task(task: Task, gold: dict[str, str], *, chat_template: bool) -> Task:
    """`task` restricted to the problems in `gold`, each prompt replaced by `restate_prompt`.

    A subclass of the task's own class, so judging (sandbox or text metric), stop strings and settings are
    exactly the task's.
    """

    class Restate(type(task)):  # type: ignore[misc]
        def problems(self) -> list[Problem]:
            return [p for p in super().problems() if p.id in gold]

        def prompt(self, problem: Problem) -> Prompt:
            return restate_prompt(super().prompt(problem), gold[problem.id], code=self.executes_code)

    restated: Task = Restate(task.cfg, chat_template=chat_template)
    restated.mode = task.mode
    return restated


def _as_messages(prompt: Prompt, target: str) -> list[dict[str, str]]:
    user = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    return [*user, {"role": "assistant", "content": target}]


def compose(
    task: Task, problems: list[Problem], greedy: dict[str, tuple[str, bool]], restated: dict[str, tuple[str, bool]],
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """SFT rows {messages, source, problem_id} from the judged greedy answers and restatements.

    `greedy` and `restated` map problem id -> (completion, accepted by the judge); a problem missing from
    `restated` (accepted at once, no gold, or paraphrasing off) goes straight to the next step.
    """
    rows: list[dict[str, Any]] = []
    stats = {"problems": len(problems), **dict.fromkeys(SOURCES, 0), "no_gold_skipped": 0}
    for p in problems:
        text, ok = greedy.get(p.id, ("", False))
        if ok:
            target, source = text, "model"
        elif restated.get(p.id, ("", False))[1]:
            target, source = restated[p.id][0], "paraphrase"
        else:
            gold = gold_answer(task, p)
            if gold is None:
                stats["no_gold_skipped"] += 1
                continue
            target, source = gold, "gold"
        stats[source] += 1
        rows.append({"messages": _as_messages(task.prompt(p), target), "source": source, "problem_id": p.id})
    return rows, stats


def _judged(samples_file: Path) -> dict[str, tuple[str, bool]]:
    out: dict[str, tuple[str, bool]] = {}
    for line in samples_file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            s = json.loads(line)
            if s["sample"] == 0:
                out[str(s["problem_id"])] = (s["completion"], bool(s["passed"]))
    return out


def build_s3ft(
    model: Any, tok: Any, task_cfg: Any, out: Path, *, paraphrase: bool = True, batch_size: int = 16, quiet: bool = False,
) -> dict[str, Any]:
    """Greedy answers, judged; restatements of the gold where rejected, judged; write the SFT rows JSONL.

    `task_cfg` must decode greedily with one sample (temperature 0, n_samples 1), as the paper does.
    """
    from tunelab.data.templating import has_chat_template
    from tunelab.evaluate.runner import run_task
    from tunelab.evaluate.tasks import TASKS
    from tunelab.generate.engine import Engine

    if task_cfg.temperature != 0 or task_cfg.n_samples != 1:
        raise UserError("data s3ft: the model's answers are greedy, one per problem (temperature 0, n_samples 1)")
    chat = has_chat_template(tok)
    task: Task = TASKS.get(task_cfg.name)(task_cfg, chat_template=chat)  # type: ignore[attr-defined]
    problems = task.problems()
    work = out.with_name(out.stem + "_s3ft")
    engine = Engine(model, tok, batch_size=batch_size)
    first = run_task(engine, task, work / "eval" / task.name / "greedy", label="greedy", quiet=quiet)
    greedy = _judged(work / "eval" / task.name / "greedy" / "samples.jsonl")
    restated: dict[str, tuple[str, bool]] = {}
    gold = {p.id: g for p in problems if not greedy.get(p.id, ("", False))[1] and (g := gold_answer(task, p)) is not None}
    if paraphrase and gold:
        run_task(engine, restate_task(task, gold, chat_template=chat), work / "eval" / task.name / "paraphrase",
                 label="paraphrase", quiet=quiet)
        restated = _judged(work / "eval" / task.name / "paraphrase" / "samples.jsonl")
    rows, stats = compose(task, problems, greedy, restated)
    if not rows:
        raise UserError(f"data s3ft: no rows (no answer was accepted and task '{task.name}' has no gold answers: {stats})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    share = {f"{s}_share": round(stats[s] / len(rows), 4) for s in SOURCES}
    return {**stats, "rows": len(rows), **share, "greedy_metrics": first["metrics"], "paraphrasing": paraphrase,
            "samples_dir": str(work), "out": str(out)}
