"""Your own code benchmark from a JSONL file, scored like HumanEval (Chen et al. 2021, arXiv 2107.03374):
run the candidate plus its tests in the sandbox, report the unbiased pass@k.

One JSON object per line: `prompt` (the task text, or a signature + docstring to continue in completion
mode; a chat row's first user turn when it has `messages` instead, as tunelab's `builtin:` sets do), `tests` (a list of assert statements, or one string of test code; a string that defines
`check(candidate)` gets `check(<entry_point>)` appended, as in HumanEval), `entry_point` (the function
under test), optional `setup` (code the sandbox runs first), optional `reference` (a known-correct solution; a
chat row's assistant answer gives it from its first code block) and optional `id` (default: the line number).
A malformed row is an error naming file:line, before any generation starts.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field

from tunelab.errors import UserError
from tunelab.evaluate.tasks import TASKS
from tunelab.evaluate.tasks._base import (
    CODE_COMPLETION_STOP,
    Problem,
    Prompt,
    Task,
    TaskConfig,
    code_request,
    read_jsonl,
)

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DEFINES_CHECK = re.compile(r"^def check\(", re.MULTILINE)
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)  # a chat row's answer: its first code block


class CodeTasksConfig(TaskConfig):
    name: Literal["codetasks"] = "codetasks"
    path: str = Field(description="JSONL file (or builtin:NAME): prompt, tests, entry_point, optional setup and id per line")


def _problem(row: dict[str, Any], where: str, lineno: int) -> Problem:
    if "prompt" not in row and isinstance(row.get("messages"), list):  # a chat row (tunelab's builtin sets)
        turns = [m for m in row["messages"] if isinstance(m, dict)]
        user = next((m.get("content") for m in turns if m.get("role") == "user"), None)
        answer = next((m.get("content") for m in turns if m.get("role") == "assistant"), None)
        fenced = _FENCE.search(answer) if isinstance(answer, str) else None
        row = {**{k: v for k, v in row.items() if k != "messages"}, "prompt": user,
               **({"reference": fenced.group(1)} if fenced and "reference" not in row else {})}
    missing = [k for k in ("prompt", "tests", "entry_point") if k not in row]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)} (need prompt, tests, entry_point)")
    prompt, tests, entry, setup = row["prompt"], row["tests"], row["entry_point"], row.get("setup")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(entry, str) or not _IDENT.fullmatch(entry):
        raise UserError(f"{where}: 'entry_point' must be a Python identifier, got {entry!r}")
    if isinstance(tests, list):
        if not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            raise UserError(f"{where}: 'tests' must be a non-empty list of assert strings")
        code = "\n".join(tests)
    elif isinstance(tests, str) and tests.strip():
        code = tests + (f"\n\ncheck({entry})" if _DEFINES_CHECK.search(tests) else "")
    else:
        raise UserError(f"{where}: 'tests' must be a list of assert strings or a string of test code")
    if setup is not None and not isinstance(setup, str):
        raise UserError(f"{where}: 'setup' must be a string of Python code")
    reference = row.get("reference")
    if reference is not None and (not isinstance(reference, str) or not reference.strip()):
        raise UserError(f"{where}: 'reference' must be a non-empty string of code (a known-correct solution)")
    pid = row.get("id", lineno)
    if not isinstance(pid, str | int):
        raise UserError(f"{where}: 'id' must be a string or an integer")
    extra = sorted(set(row) - {"prompt", "tests", "entry_point", "setup", "id", "reference"})
    meta = {k: row[k] for k in extra}
    return Problem(id=str(pid), prompt=prompt, tests=code, entry_point=entry, setup=setup or None, meta=meta,
                   reference=reference)


@TASKS.register("codetasks")
class CodeTasks(Task):
    Config = CodeTasksConfig

    def load(self) -> list[Problem]:
        from tunelab.data.sources import resolve

        path = resolve(self.cfg.path)  # type: ignore[attr-defined]  # builtin:NAME too
        problems: list[Problem] = []
        seen: dict[str, int] = {}
        for lineno, row in read_jsonl(path, "codetasks.path"):
            where = f"{path}:{lineno}"
            p = _problem(row, where, lineno)
            if p.id in seen:
                raise UserError(f"{where}: duplicate id {p.id!r} (first on line {seen[p.id]})")
            seen[p.id] = lineno
            problems.append(p)
        return problems

    def prompt(self, problem: Problem) -> Prompt:
        if self.mode == "completion":
            return problem.prompt
        return code_request(f"{problem.prompt.strip()}\n\nThe solution must define `{problem.entry_point}`.")

    def stop(self) -> tuple[str, ...]:
        return CODE_COMPLETION_STOP if self.mode == "completion" else ()

    def program(self, problem: Problem, completion: str) -> tuple[str, str | None]:
        from tunelab.evaluate.extract import extract_code

        mode = "completion" if self.mode == "completion" else "chat"
        code = extract_code(completion, prompt=problem.prompt, entry_point=problem.entry_point, mode=mode)
        return f"{code}\n\n{problem.tests}\n", problem.setup
