"""The task contract shared by every evaluation task (one file per task in this folder).

A task turns dataset rows into `Problem`s, a problem into a prompt (chat messages, or plain text for raw
completion), and completions into per-sample `SampleResult`s. Code tasks (`executes_code = True`) do not
execute anything themselves: they build `(program, setup)` pairs with `program()`, the sandbox runs them,
and `judge()` turns the sandbox verdicts into results; this split lets the runner execute one batch while
the next one generates. Metrics default to the unbiased pass@k (Chen et al. 2021, arXiv 2107.03374) for
every k in {1, 10, 100} that is <= n_samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.errors import UserError

if TYPE_CHECKING:  # importing the engine pulls in torch: `tunelab config` validates tasks without it
    from tunelab.generate.engine import SamplingSettings

#: chat messages (rendered with the chat template) or plain text (raw completion)
Prompt = str | list[dict[str, str]]
PASS_KS = (1, 10, 100)
# Codex paper (arXiv 2107.03374, section 3): raw code completion stops at a new top-level statement
CODE_COMPLETION_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


class TaskConfig(BaseModel):
    """Fields every task has; a task's own `Config` subclasses this and adds `name: Literal[...]`."""

    model_config = ConfigDict(extra="forbid")

    limit: int | None = Field(None, gt=0, description="evaluate only the first N problems")
    skip: int = Field(0, ge=0, description="skip the first N problems (e.g. the rows a run trained on); before limit")
    n_samples: int = Field(1, ge=1, description="completions per problem; pass@k is reported for k <= n_samples")
    temperature: float = Field(0.0, ge=0, description="sampling temperature; 0 = greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (sampling only)")
    max_new_tokens: int = Field(512, ge=1, description="generated tokens per completion")
    prompt_mode: Literal["auto", "chat", "completion"] = Field(
        "auto", description="chat = the model's chat template; completion = raw text; auto = chat if the tokenizer has one"
    )
    timeout: float = Field(10.0, gt=0, description="wall-clock seconds per program in the sandbox")
    memory_mb: int = Field(1024, ge=64, description="memory limit per program in the sandbox")
    seed: int = Field(0, description="sampling seed")

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> TaskConfig:
        # greedy decoding gives n identical samples: n > 1 would cost n times the time and measure nothing new
        if self.n_samples > 1 and self.temperature == 0:
            raise ValueError("n_samples > 1 needs temperature > 0 (greedy decoding repeats the same sample)")
        return self


@dataclass
class Problem:
    id: str
    prompt: str  # the dataset's own prompt text (HumanEval: signature + docstring; MBPP: the description)
    tests: str = ""  # test code appended after the candidate
    entry_point: str | None = None
    setup: str | None = None  # code the sandbox runs before the program (imports, fixtures)
    reference: str | None = None  # a known-correct solution, when the dataset ships one
    references: list[str] = field(default_factory=list)  # reference answers of text tasks
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleResult:
    passed: bool
    status: str  # sandbox status for code (passed, failed, timeout, ...); metric verdict for text
    reason: str = ""
    program: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    isolation: str | None = None


def pass_at_k_metrics(counts: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Mean unbiased pass@k over problems from (n samples, c correct) pairs, for k in {1, 10, 100} <= n."""
    from tunelab.evaluate.passk import aggregate

    return aggregate(counts, PASS_KS, skip_unavailable=True) if counts else {}


class Task:
    Config: ClassVar[type[TaskConfig]]
    #: completions are programs judged by the sandbox (else `score` judges text directly)
    executes_code: ClassVar[bool] = True
    #: what `prompt_mode: auto` means for a tokenizer without a chat template
    plain_mode: ClassVar[str] = "completion"

    def __init__(self, cfg: TaskConfig, *, chat_template: bool = True) -> None:
        self.cfg = cfg
        mode = cfg.prompt_mode
        self.mode: str = ("chat" if chat_template else self.plain_mode) if mode == "auto" else mode

    @property
    def name(self) -> str:
        return self.cfg.name  # type: ignore[attr-defined]

    # ---- data and prompts (per task)
    def load(self) -> list[Problem]:
        raise NotImplementedError

    def problems(self) -> list[Problem]:
        problems = self.load()
        problems = problems[self.cfg.skip :]
        return problems[: self.cfg.limit] if self.cfg.limit else problems

    def prompt(self, problem: Problem) -> Prompt:
        raise NotImplementedError

    def stop(self) -> tuple[str, ...]:
        return ()

    def training_target(self, problem: Problem) -> str | None:
        """The reference answer as a supervised target after `prompt(problem)`: what the model should write
        in this mode, ending where its generations should end; None when the problem ships no reference.

        Chat mode: the code in one fenced block (what the extractor looks for); plain modes: the reference
        as it continues the prompt. A task whose plain completions end at a marker, or whose reference
        repeats the prompt, overrides this.
        """
        ref = problem.reference or (problem.references[0] if problem.references else None)
        if ref is None:
            return None
        if self.mode == "chat" and self.executes_code:
            code = ref.strip("\n")
            return f"```python\n{code}\n```"
        return ref

    def sampling(self) -> SamplingSettings:
        from tunelab.generate.engine import SamplingSettings

        c = self.cfg
        return SamplingSettings(
            max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
            n=c.n_samples, seed=c.seed, stop=self.stop(),
        )

    # ---- scoring
    def program(self, problem: Problem, completion: str) -> tuple[str, str | None]:
        """(program, sandbox setup) for one completion of a code task."""
        raise NotImplementedError

    def judge(self, problem: Problem, programs: Sequence[tuple[str, str | None]], executions: Sequence[Any]) -> list[SampleResult]:
        """Sandbox verdicts -> results; the verdict is the sandbox's alone (exit codes/stdout are not trusted)."""
        return [
            SampleResult(bool(r.passed), str(r.status), str(r.reason or ""), prog, {}, getattr(r, "isolation", None))
            for (prog, _), r in zip(programs, executions, strict=True)
        ]

    def score(self, problem: Problem, completions: Sequence[str]) -> list[SampleResult]:
        """Per-sample results for `completions` of `problem` (code tasks run them in the sandbox here)."""
        from tunelab.evaluate.sandbox import execute_many

        programs = [self.program(problem, c) for c in completions]
        runs = execute_many(programs, timeout=self.cfg.timeout, memory_mb=self.cfg.memory_mb)
        return self.judge(problem, programs, runs)

    def metrics(self, results: dict[str, list[SampleResult]]) -> dict[str, float]:
        """Task metrics from every problem's results (default: pass@k)."""
        return pass_at_k_metrics([(len(r), sum(s.passed for s in r)) for r in results.values()])


# ---------------------------------------------------------------------------------------------- helpers


def read_jsonl(path: str | Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a bad line is a UserError naming file:line."""
    from tunelab.data.sources import iter_jsonl

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what}: file not found: {p}")
    rows = list(iter_jsonl(p))
    if not rows:
        raise UserError(f"{p}: no rows")
    return rows


def code_request(text: str) -> list[dict[str, str]]:
    """A single user turn asking for code in one fenced block (what the extractor looks for)."""
    return [{"role": "user", "content": text.rstrip() + "\n\nAnswer with the complete code in one ```python code block."}]
