"""Run evaluation tasks on one model and write `run_dir/eval/<task>/<label>/{samples.jsonl,summary.json}`.

For each task: build prompts, generate `n_samples` completions per problem (batched, longest prompts
first), turn each completion into a program and run it in the sandbox. Execution overlaps generation: each
generated batch's programs go to a one-thread pool that calls `sandbox.execute_many` (which fans out to its
own worker processes) while the model generates the next batch. Every sample is written with its status and
failure reason; the summary holds pass@k (unbiased estimator, k in {1, 10, 100} with k <= n) and how it
was measured (`settings`), in the format `tunelab.report` reads.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tunelab.data.templating import has_chat_template
from tunelab.errors import UserError
from tunelab.evaluate.tasks._base import Problem, SampleResult, Task
from tunelab.generate.engine import Engine, Generated


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[BaseModel | dict[str, Any] | str],
    run_dir: Path,
    label: str,
    *,
    batch_size: int = 16,
    backend: str = "auto",
    model_path: str | None = None,
    adapter_path: str | None = None,
    quiet: bool = False,
) -> dict[str, dict[str, Any]]:
    """Evaluate `model` on every task config; returns {task dir name: summary}.

    `model_path`/`adapter_path` (weights on disk) only matter for the vLLM backend; see `Engine`.
    """
    from tunelab.evaluate.tasks import TASKS

    configs = [TASKS.parse(t, f"eval.tasks[{i}]") for i, t in enumerate(tasks)]
    engine = Engine(
        model, tokenizer, batch_size=batch_size, backend=backend,  # type: ignore[arg-type]
        model_path=model_path, adapter_path=adapter_path,
    )
    out: dict[str, dict[str, Any]] = {}
    for cfg in configs:
        task: Task = TASKS.get(cfg.name)(cfg, chat_template=has_chat_template(tokenizer))  # type: ignore[attr-defined]
        key = _unique(task.name, out)
        out[key] = run_task(engine, task, Path(run_dir) / "eval" / key / label, label=label, quiet=quiet)
    return out


def _unique(name: str, taken: dict[str, Any]) -> str:
    # the same task twice (e.g. two MBPP splits) must not overwrite the first one's files
    key, i = name, 2
    while key in taken:
        key, i = f"{name}-{i}", i + 1
    return key


class _Collector:
    """Per-problem results as they arrive, in whatever order batches finish."""

    def __init__(self, problems: list[Problem], n: int) -> None:
        self.problems, self.n = problems, n
        self.results: list[list[SampleResult | None]] = [[None] * n for _ in problems]
        self.rows: list[list[dict[str, Any] | None]] = [[None] * n for _ in problems]
        self.done_problems = self.scored = self.passed = 0

    def add(self, g: Generated, prompt: str, result: SampleResult) -> None:
        self.results[g.prompt_index][g.sample] = result
        c = g.completion
        self.rows[g.prompt_index][g.sample] = {
            "problem_id": self.problems[g.prompt_index].id, "sample": g.sample, "prompt": prompt,
            "completion": c.text, "program": result.program, "status": result.status, "passed": result.passed,
            "reason": result.reason, "finish_reason": c.finish_reason, "n_tokens": c.n_tokens,
            **({"metrics": result.metrics} if result.metrics else {}),
        }
        self.scored += 1
        self.passed += result.passed
        if all(r is not None for r in self.results[g.prompt_index]):
            self.done_problems += 1


def run_task(engine: Engine, task: Task, out_dir: Path, *, label: str, quiet: bool = False,
             problems: list[Problem] | None = None) -> dict[str, Any]:
    """Generate, judge and write one task's samples and summary; `problems`: a subset (default: the task's own)."""
    t0 = time.perf_counter()
    problems = task.problems() if problems is None else problems
    if not problems:
        raise UserError(f"task '{task.name}': no problems to evaluate (check limit/split/path)")
    prompts = [task.prompt(p) for p in problems]
    rendered = [engine.render(p) for p in prompts]
    sampling = task.sampling()
    col = _Collector(problems, sampling.n)
    with _progress(task.name, len(problems), quiet) as tick:
        if task.executes_code:
            from tunelab.evaluate.sandbox import check_isolation

            check_isolation()  # refuse before generating anything, not after
            _run_code(engine, task, problems, prompts, rendered, col, tick)
        else:
            _run_text(engine, task, problems, prompts, rendered, col, tick)
    return _write(task, col, out_dir, label, engine, time.perf_counter() - t0)


def _run_code(engine: Engine, task: Task, problems: list[Problem], prompts: list[Any], rendered: list[str], col: _Collector, tick: Any) -> None:
    from tunelab.evaluate.sandbox import execute_many

    cfg = task.cfg
    pending: list[tuple[list[Generated], list[tuple[str, str | None]], Future]] = []

    def collect(block: bool) -> None:
        while pending and (block or pending[0][2].done()):
            batch, programs, fut = pending.pop(0)
            for g, prog, run in zip(batch, programs, fut.result(), strict=True):
                col.add(g, rendered[g.prompt_index], task.judge(problems[g.prompt_index], [prog], [run])[0])
            tick(col)

    # one thread: the sandbox parallelises inside execute_many; batches are judged in generation order
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunelab-sandbox") as pool:
        for batch in engine.stream(prompts, task.sampling()):
            programs = [task.program(problems[g.prompt_index], g.completion.text) for g in batch]
            fut = pool.submit(execute_many, programs, timeout=cfg.timeout, memory_mb=cfg.memory_mb)
            pending.append((batch, programs, fut))
            collect(block=False)
        collect(block=True)


def _run_text(engine: Engine, task: Task, problems: list[Problem], prompts: list[Any], rendered: list[str], col: _Collector, tick: Any) -> None:
    # text metrics may need all samples of a problem at once (e.g. corpus statistics), so score per problem
    waiting: dict[int, list[Generated | None]] = {}
    for batch in engine.stream(prompts, task.sampling()):
        for g in batch:
            slot = waiting.setdefault(g.prompt_index, [None] * col.n)
            slot[g.sample] = g
            if all(x is not None for x in slot):
                gens: list[Generated] = waiting.pop(g.prompt_index)  # type: ignore[assignment]
                scores = task.score(problems[g.prompt_index], [x.completion.text for x in gens])
                for x, result in zip(gens, scores, strict=True):
                    col.add(x, rendered[x.prompt_index], result)
        tick(col)


@contextmanager
def _progress(name: str, total: int, quiet: bool) -> Iterator[Any]:
    from rich.errors import LiveError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn(f"[bold]eval {name}"), BarColumn(), MofNCompleteColumn(), TextColumn("problems"),
        TextColumn("pass {task.fields[rate]}"), TimeElapsedColumn(), disable=quiet,
    )
    bar = progress.add_task(name, total=total, rate="-")
    try:
        progress.start()
    except LiveError:  # called inside another live display (the training bar): stay silent, don't crash
        progress = Progress(disable=True)
        bar = progress.add_task(name, total=total, rate="-")

    def tick(col: _Collector) -> None:
        rate = f"{col.passed / col.scored:.1%} of {col.scored} samples" if col.scored else "-"
        progress.update(bar, completed=col.done_problems, rate=rate)

    try:
        yield tick
    finally:
        progress.stop()


def _warnings(statuses: Counter[str]) -> list[str]:
    # a sandbox that cannot start turns every sample into a failure: say so, never let 0.0 pass as a score
    bad = statuses.get("sandbox_error", 0)
    if not bad:
        return []
    return [f"{bad} of {sum(statuses.values())} samples were not run (sandbox_error; see their reasons in "
            "samples.jsonl): they count as failures, so pass@k is a lower bound"]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a reader (the report) never sees half a file


def _write(task: Task, col: _Collector, out_dir: Path, label: str, engine: Engine, wall: float) -> dict[str, Any]:
    results = {p.id: [r for r in col.results[i] if r is not None] for i, p in enumerate(col.problems)}
    isolation = sorted({r.isolation for rs in results.values() for r in rs if r.isolation})
    statuses = Counter(r.status for rs in results.values() for r in rs)
    s = task.sampling()
    summary = {
        "task": task.name, "label": label, "metrics": task.metrics(results),
        "n_problems": len(col.problems), "n_samples": s.n,
        "isolation": ", ".join(isolation) if isolation else None,
        "per_problem": {pid: {"passed": sum(r.passed for r in rs), "n": len(rs)} for pid, rs in results.items()},
        "status_counts": dict(statuses.most_common()), "warnings": _warnings(statuses),
        "wall_s": round(wall, 2),
        "settings": {
            **task.cfg.model_dump(mode="json"), "prompt_mode_used": task.mode,
            "decoding": "greedy" if s.greedy else "sampling", "stop": list(s.stop),
            "backend": engine.backend.name, "batch_size": engine.batch_size,
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for per in col.rows for r in per if r is not None]
    _atomic_write(out_dir / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False))
    return summary
