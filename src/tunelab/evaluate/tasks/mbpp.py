"""MBPP: Mostly Basic Python Problems, 974 short crowd-sourced programming tasks (Austin et al. 2021,
"Program Synthesis with Large Language Models", arXiv 2108.07732; data: google-research `mbpp/mbpp.jsonl`,
or the hand-verified `sanitized-mbpp.json`, CC BY 4.0).

Each problem is one sentence (`text`) plus three `assert` tests; a problem is solved iff the candidate,
followed by all its asserts, runs to the end in the sandbox (`test_setup_code` runs between the code and the asserts;
`challenge_test_list` only when `challenge_tests` is on). Splits are by task_id as in the paper and the HF
`mbpp` "full" config: prompt 1-10, test 11-510, validation 511-600, train 601-974. `fewshot` mode is the
paper's 3-shot prompt with task_ids 2, 3 and 4 as exemplars, each "You are an expert Python programmer,
and here is your task: {text} Your code should pass these tests:\\n\\n{tests}\\n[BEGIN]\\n{code}\\n[DONE]",
and the output is cut at "[DONE]". The paper gives no separator between shots; we use a newline. `chat`
mode (for instruct models) asks for the code in a fenced block. Deviation: the paper reports the fraction
solved by any of 80 samples at T=0.5; we report the unbiased pass@k for k <= n_samples.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tunelab.errors import UserError, read_utf8
from tunelab.evaluate.tasks import TASKS
from tunelab.evaluate.tasks._base import Problem, Prompt, Task, TaskConfig, code_request, read_jsonl

SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
FEWSHOT_IDS = (2, 3, 4)
HUB_ID = "google-research-datasets/mbpp"  # the dataset formerly published as `mbpp`
INTRO = "You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"


class MBPPConfig(TaskConfig):
    name: Literal["mbpp"] = "mbpp"
    path: str | None = Field(
        None, description="mbpp.jsonl (full) or sanitized-mbpp.json; default: the HF dataset (needs network)"
    )
    split: Literal["prompt", "test", "validation", "train", "all"] = Field(
        "test", description="task_id ranges: prompt 1-10, test 11-510, validation 511-600, train 601-974"
    )
    prompt_mode: Literal["auto", "chat", "fewshot"] = Field(
        "auto", description="fewshot = the paper's 3-shot prompt (base models); chat = ask an instruct model; "
        "auto = chat if the tokenizer has a chat template"
    )
    challenge_tests: bool = Field(False, description="also run challenge_test_list (harder asserts, often empty)")


def _lf(code: str) -> str:
    # Python's tokenizer reads a lone CR as a line end too, so this changes no program's meaning
    return code.replace("\r\n", "\n").replace("\r", "\n")


def _normalise(row: dict[str, Any], where: str) -> dict[str, Any]:
    """Full and sanitized files name fields differently; both become text/code/tests/setup."""
    try:
        text = row.get("text") or row["prompt"]
        setup = row.get("test_setup_code") or "\n".join(row.get("test_imports") or [])
        return {
            "task_id": int(row["task_id"]), "text": str(text).strip(),
            "code": _lf(str(row["code"])),  # the raw file has CRLF (and a few lone CR) line ends
            "tests": list(row["test_list"]), "challenge": list(row.get("challenge_test_list") or []),
            "setup": _lf(setup),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: not an MBPP row ({type(e).__name__}: {e}); expected task_id, text, code, test_list") from None


def _read_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"mbpp.path: file not found: {path}")
    text = read_utf8(path)
    if text.lstrip().startswith("["):  # sanitized-mbpp.json is one JSON array
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise UserError(f"{path}: invalid JSON ({e})") from None
        return [_normalise(r, f"{path}[{i}]") for i, r in enumerate(rows)]
    return [_normalise(r, f"{path}:{n}") for n, r in read_jsonl(path, "mbpp.path")]


def _read_hub() -> list[dict[str, Any]]:
    from tunelab.models import _hub_reachable

    if not _hub_reachable():
        raise UserError(
            "mbpp: no `path` given and the Hugging Face hub is unreachable (offline); download mbpp.jsonl "
            "(google-research/google-research, mbpp/mbpp.jsonl) and pass it as path (CLI: --data)"
        )
    import datasets

    splits = datasets.load_dataset(HUB_ID, "full")
    return [_normalise(dict(r), f"{HUB_ID}:{name}") for name, ds in splits.items() for r in ds]


@TASKS.register("mbpp")
class MBPP(Task):
    Config = MBPPConfig
    plain_mode = "fewshot"

    def __init__(self, cfg: MBPPConfig, *, chat_template: bool = True) -> None:
        super().__init__(cfg, chat_template=chat_template)
        self._rows: list[dict[str, Any]] | None = None

    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            cfg: MBPPConfig = self.cfg  # type: ignore[assignment]
            rows = _read_file(Path(cfg.path).expanduser()) if cfg.path else _read_hub()
            self._rows = sorted(rows, key=lambda r: r["task_id"])
        return self._rows

    def load(self) -> list[Problem]:
        split = self.cfg.split  # type: ignore[attr-defined]
        lo, hi = SPLITS.get(split, (1, 10**9))
        out = []
        for r in self.rows():
            if lo <= r["task_id"] <= hi:
                tests = r["tests"] + (r["challenge"] if self.cfg.challenge_tests else [])  # type: ignore[attr-defined]
                out.append(
                    Problem(
                        id=str(r["task_id"]), prompt=r["text"], tests="\n".join(tests),
                        setup=r["setup"] or None, reference=r["code"], meta={"test_list": r["tests"]},
                    )
                )
        return out

    def _fewshot_prefix(self) -> str:
        by_id = {r["task_id"]: r for r in self.rows()}
        missing = [i for i in FEWSHOT_IDS if i not in by_id]
        if missing:
            raise UserError(f"mbpp: fewshot mode needs the exemplar task_ids {missing} in the data file; use prompt_mode=chat")
        shots = [
            INTRO.format(text=by_id[i]["text"], tests="\n".join(by_id[i]["tests"])) + by_id[i]["code"].strip() + "\n[DONE]"
            for i in FEWSHOT_IDS
        ]
        return "\n".join(shots) + "\n"

    def prompt(self, problem: Problem) -> Prompt:
        tests = "\n".join(problem.meta["test_list"])
        if self.mode == "fewshot":
            return self._fewshot_prefix() + INTRO.format(text=problem.prompt, tests=tests)
        return code_request(f"{problem.prompt}\nYour code should pass these tests:\n\n```python\n{tests}\n```")

    def stop(self) -> tuple[str, ...]:
        return ("[DONE]",) if self.mode == "fewshot" else ()

    def training_target(self, problem: Problem) -> str | None:
        # the few-shot exemplars end each solution with "[DONE]", where generation stops; a target without it
        # would teach the tuned model to run on into another problem
        target = super().training_target(problem)
        if target is not None and self.mode == "fewshot":
            target = target.strip("\n") + "\n[DONE]"
        return target

    def program(self, problem: Problem, completion: str) -> tuple[str, str | None]:
        from tunelab.evaluate.extract import extract_code

        code = completion.strip("\n")
        # few-shot output is bare code up to [DONE] (stop string), module-level constants included; only when
        # it is not plain Python does the prose/fence-aware extractor pick the code out
        if self.mode != "fewshot" or not _parses(code):
            code = extract_code(completion, mode="chat")
        # test_setup_code may build inputs from the candidate's own classes (tasks 367, 927 build trees
        # from its Node), so it runs after the candidate code, before the asserts
        setup = f"{problem.setup}\n\n" if problem.setup else ""
        return f"{code}\n\n{setup}{problem.tests}\n", None


def _parses(code: str) -> bool:
    try:
        ast.parse(code)  # parsing only; nothing is executed
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return bool(code.strip())
