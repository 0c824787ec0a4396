"""Evaluation tasks: data loading, prompts, config checks, metrics, and scoring known-good/bad code in the sandbox.

The "model" here is a fake engine that answers with the dataset's reference solutions (or wrong ones), so the
whole path prompt -> extract -> sandbox -> pass@k -> files is checked without generating anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import MBPP_FILE, needs_mbpp
from pydantic import ValidationError

from tunelab.errors import UserError
from tunelab.evaluate.tasks import TASKS
from tunelab.evaluate.tasks._base import Task
from tunelab.generate.engine import Completion, Generated, SamplingSettings


def _task(spec: dict[str, Any], chat_template: bool = True) -> Task:
    cfg = TASKS.parse(spec, "test")
    return TASKS.get(spec["name"])(cfg, chat_template=chat_template)


# ------------------------------------------------------------------------------------------ HumanEval


def test_humaneval_has_164_problems_and_both_prompt_modes() -> None:
    chat = _task({"name": "humaneval"})
    problems = chat.problems()
    assert len(problems) == 164 and problems[0].id == "HumanEval/0" and problems[163].id == "HumanEval/163"
    p = problems[2]
    assert p.entry_point == "truncate_number" and "def check(candidate)" in p.tests
    msgs = chat.prompt(p)
    assert msgs[-1]["role"] == "user" and f"```python\n{p.prompt.strip()}\n```" in msgs[-1]["content"]
    assert chat.stop() == ()
    raw = _task({"name": "humaneval", "prompt_mode": "completion"})
    assert raw.prompt(p) == p.prompt and "\ndef" in raw.stop()
    assert _task({"name": "humaneval"}, chat_template=False).mode == "completion"  # auto without a template
    assert len(_task({"name": "humaneval", "limit": 5}).problems()) == 5


def test_task_configs_are_strict() -> None:
    with pytest.raises(ValidationError, match="extra"):
        TASKS.parse({"name": "humaneval", "pathh": "x"}, "t")
    with pytest.raises(ValidationError, match="temperature"):
        TASKS.parse({"name": "humaneval", "n_samples": 10}, "t")  # greedy n>1 is a mistake
    assert TASKS.parse({"name": "humaneval", "n_samples": 10, "temperature": 0.8}, "t").n_samples == 10
    with pytest.raises(UserError, match="did you mean 'mbpp'"):
        TASKS.parse({"name": "mbp"}, "t")
    for name in ("humaneval", "mbpp", "codetasks", "generation"):
        assert name in TASKS and TASKS.describe(name)["summary"]


# ----------------------------------------------------------------------------------------------- MBPP


@needs_mbpp
def test_mbpp_splits_by_task_id() -> None:
    counts = {s: len(_task({"name": "mbpp", "path": str(MBPP_FILE), "split": s}).problems())
              for s in ("prompt", "test", "validation", "train")}
    assert counts == {"prompt": 10, "test": 500, "validation": 90, "train": 374}
    test = _task({"name": "mbpp", "path": str(MBPP_FILE)}).problems()
    assert test[0].id == "11" and test[-1].id == "510" and all("\r" not in p.reference for p in test)


@needs_mbpp
def test_mbpp_fewshot_prompt_is_the_papers() -> None:
    task = _task({"name": "mbpp", "path": str(MBPP_FILE), "prompt_mode": "fewshot"})
    p = task.problems()[0]
    prompt = task.prompt(p)
    intro = "You are an expert Python programmer, and here is your task: "
    assert prompt.startswith(intro + "Write a function to find the similar elements from the given two tuple lists.")
    assert prompt.count(intro) == 4 and prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3
    assert prompt.endswith(f"{intro}{p.prompt} Your code should pass these tests:\n\n{p.tests}\n[BEGIN]\n")
    assert "\r" not in prompt and "[DONE]\nYou are" in prompt
    assert task.stop() == ("[DONE]",)
    assert _task({"name": "mbpp", "path": str(MBPP_FILE)}, chat_template=False).mode == "fewshot"
    chat = _task({"name": "mbpp", "path": str(MBPP_FILE), "prompt_mode": "chat"}).prompt(p)
    assert p.prompt in chat[-1]["content"] and p.tests.splitlines()[0] in chat[-1]["content"]


def test_mbpp_without_data_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="not found"):
        _task({"name": "mbpp", "path": str(tmp_path / "nope.jsonl")}).problems()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="offline"):
        _task({"name": "mbpp"}).problems()


# ----------------------------------------------------------------------------------------- codetasks


def _jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "Add two numbers.", "tests": ["assert add(1, 2) == 3"], "entry_point": "add"}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("{not json", "malformed JSON"),
        ({"prompt": "x", "entry_point": "f"}, "missing field"),
        ({**GOOD, "tests": []}, "non-empty list"),
        ({**GOOD, "tests": 3}, "'tests' must be"),
        ({**GOOD, "entry_point": "not an identifier"}, "identifier"),
        ({**GOOD, "setup": ["import os"]}, "'setup'"),
    ],
)
def test_codetasks_bad_rows_name_file_and_line(tmp_path: Path, row: Any, message: str) -> None:
    path = _jsonl(tmp_path / "t.jsonl", [GOOD, "", row])
    with pytest.raises(UserError, match=message) as e:
        _task({"name": "codetasks", "path": path}).problems()
    assert f"{path}:3" in str(e.value)


def test_codetasks_duplicate_ids_and_check_functions(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{**GOOD, "id": "a"}, {**GOOD, "id": "a"}])
    with pytest.raises(UserError, match="duplicate id"):
        _task({"name": "codetasks", "path": path}).problems()
    check = {**GOOD, "tests": "def check(candidate):\n    assert candidate(2, 2) == 4\n"}
    task = _task({"name": "codetasks", "path": _jsonl(tmp_path / "c.jsonl", [GOOD, check])})
    a, b = task.problems()
    assert a.id == "1" and b.tests.rstrip().endswith("check(add)")
    good, bad = "```python\ndef add(a, b):\n    return a + b\n```", "```python\ndef add(a, b):\n    return a - b\n```"
    assert [r.passed for r in task.score(b, [good, bad])] == [True, False]


# ---------------------------------------------------------------------------------------- generation


def test_generation_metrics_on_hand_made_references(tmp_path: Path) -> None:
    rows = [{"prompt": "Capital of France?", "reference": "Paris"},
            {"prompt": "Say hi", "references": ["hello there", "hi"], "id": "greet"}]
    task = _task({"name": "generation", "path": _jsonl(tmp_path / "g.jsonl", rows)})
    paris, greet = task.problems()
    assert greet.id == "greet" and paris.id == "1"
    exact, contains, wrong = task.score(paris, ["  Paris ", "It is Paris.", "London"])
    assert (exact.passed, contains.passed, wrong.passed) == (True, False, False)
    assert exact.metrics["exact_match"] == 1 and exact.metrics["rouge_l"] == 1 and exact.metrics["bleu"] == pytest.approx(100)
    assert contains.metrics["contains"] == 1 and contains.metrics["exact_match"] == 0
    assert 0 < contains.metrics["rouge_l"] < 1 and wrong.metrics["rouge_l"] == 0 and wrong.reason
    (hi,) = task.score(greet, ["hello there"])  # any reference counts
    assert hi.passed and hi.metrics["bleu"] == pytest.approx(100)
    m = task.metrics({"1": task.score(paris, ["Paris"]), "greet": [hi]})  # one sample each, both exact
    assert m["pass@1"] == 1.0 and m["exact_match"] == 1.0 and m["rouge_l"] == 1.0
    assert m["bleu"] == 0.0  # corpus BLEU (unsmoothed) has no 4-grams in 1-2 word answers
    fox = task.problems()[0]
    fox.id, fox.references = "fox", ["the quick brown fox jumps over the lazy dog"]
    assert task.metrics({"fox": task.score(fox, ["the quick brown fox jumps over the lazy dog"])})["bleu"] == pytest.approx(100)
    half = task.metrics({"1": task.score(paris, ["Paris", "London"])})
    assert half["pass@1"] == 0.5 and half["contains"] == 0.5 and 0 < half["rouge_l"] < 1
    lenient = _task({"name": "generation", "path": str(tmp_path / "g.jsonl"), "pass_metric": "contains", "ignore_case": True})
    assert lenient.score(paris, ["it is PARIS."])[0].passed


def test_generation_bad_rows(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"g.jsonl:2: needs 'reference'"):
        _task({"name": "generation", "path": _jsonl(tmp_path / "g.jsonl", [{"prompt": "a", "reference": "b"}, {"prompt": "c"}])}).problems()


# ------------------------------------------------------------------- fake model through the sandbox


class FakeEngine:
    """Stands in for `Engine`: answers every prompt with `answer(problem_index, sample)`."""

    batch_size = 2

    class backend:  # noqa: N801 - mimics the attribute the runner reads
        name = "fake"

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def render(self, prompt: Any) -> str:
        return prompt if isinstance(prompt, str) else json.dumps(prompt)

    def stream(self, prompts: list[Any], settings: SamplingSettings) -> Any:
        rows = [(i, s) for i in range(len(prompts)) for s in range(settings.n)]
        for k in range(0, len(rows), self.batch_size):
            yield [Generated(i, s, Completion(self.answer(i, s), 1, "eos")) for i, s in rows[k : k + self.batch_size]]


def _fenced(code: str) -> str:
    return f"Here you go:\n```python\n{code}\n```\nDone."


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(tmp_path: Path) -> None:
    from tunelab.evaluate.runner import run_task

    task = _task({"name": "humaneval", "limit": 5, "prompt_mode": "completion"})
    problems = task.problems()
    for p in problems:  # completion mode: the canonical body continues the prompt
        body = p.reference[len(p.prompt):]
        assert task.score(p, [body])[0].passed, p.id
    chat = _task({"name": "humaneval", "limit": 5, "n_samples": 2, "temperature": 0.5})
    # sample 0 right, sample 1 wrong: pass@1 is exactly 0.5 on every problem
    engine = FakeEngine(lambda i, s: _fenced(problems[i].reference if s == 0 else f"def {problems[i].entry_point}(*a):\n    return None"))
    summary = run_task(engine, chat, tmp_path / "eval" / "humaneval" / "after", label="after", quiet=True)  # type: ignore[arg-type]
    assert summary["metrics"] == {"pass@1": 0.5} and summary["n_problems"] == 5 and summary["n_samples"] == 2
    assert all(v == {"passed": 1, "n": 2} for v in summary["per_problem"].values())
    samples = [json.loads(x) for x in (tmp_path / "eval/humaneval/after/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 10
    assert all(s["passed"] == (s["sample"] == 0) for s in samples)
    assert all(s["reason"] for s in samples if not s["passed"])
    from tunelab.report import write_report

    assert "pass@1" in write_report(tmp_path).read_text()


@pytest.mark.parametrize("mode", ["completion", "chat"])
def test_all_164_humaneval_canonical_solutions_pass_through_the_harness(mode: str) -> None:
    # a 0.0 baseline must mean the model failed, not the harness: every canonical solution, as a completion
    # (the body continuing the prompt) or as a chat answer (the whole function in a fence), passes
    from tunelab.evaluate.sandbox import execute_many

    task = _task({"name": "humaneval", "prompt_mode": mode})
    problems = task.problems()
    answers = [p.reference[len(p.prompt):] if mode == "completion" else _fenced(p.reference) for p in problems]
    results = execute_many([task.program(p, a) for p, a in zip(problems, answers, strict=True)])
    assert [p.id for p, r in zip(problems, results, strict=True) if not r.passed] == []


@needs_mbpp
def test_mbpp_reference_solutions_pass_and_wrong_ones_fail() -> None:
    task = _task({"name": "mbpp", "path": str(MBPP_FILE), "limit": 5, "prompt_mode": "chat"})
    for p in task.problems():
        good, bad = task.score(p, [_fenced(p.reference), _fenced("def nothing():\n    pass")])
        assert good.passed, (p.id, good.status, good.reason)
        assert not bad.passed and bad.reason
    fewshot = _task({"name": "mbpp", "path": str(MBPP_FILE), "limit": 2, "prompt_mode": "fewshot"})
    p = fewshot.problems()[0]
    assert fewshot.score(p, [p.reference + "\n"])[0].passed


@needs_mbpp
def test_mbpp_setup_code_runs_after_the_candidate() -> None:
    """Tasks 367 and 927 build their test trees with the candidate's own Node class in test_setup_code."""
    task = _task({"name": "mbpp", "path": str(MBPP_FILE), "split": "all", "prompt_mode": "chat"})
    probs = {p.id: p for p in task.problems() if p.id in ("367", "927")}
    assert set(probs) == {"367", "927"} and all(p.setup for p in probs.values())
    for p in probs.values():
        (good,) = task.score(p, [_fenced(p.reference)])
        assert good.passed, (p.id, good.status, good.reason)


def test_text_task_through_the_runner(tmp_path: Path) -> None:
    from tunelab.evaluate.runner import run_task

    rows = [{"prompt": f"Say {w}", "reference": w} for w in ("yes", "no", "maybe")]
    task = _task({"name": "generation", "path": _jsonl(tmp_path / "g.jsonl", rows), "n_samples": 3, "temperature": 1.0})
    # batches of 2 rows split a problem's 3 samples across batches: scoring must wait for all of them
    engine = FakeEngine(lambda i, s: ["yes", "no", "maybe"][i] if s < 2 else "nope")
    summary = run_task(engine, task, tmp_path / "out", label="before", quiet=True)  # type: ignore[arg-type]
    assert summary["metrics"]["pass@1"] == pytest.approx(2 / 3) and summary["isolation"] is None
    assert summary["per_problem"] == {str(i): {"passed": 2, "n": 3} for i in (1, 2, 3)}
    rows_out = [json.loads(x) for x in (tmp_path / "out/samples.jsonl").read_text().splitlines()]
    assert [(r["problem_id"], r["sample"]) for r in rows_out] == [(str(i), s) for i in (1, 2, 3) for s in range(3)]
    assert all("rouge_l" in r["metrics"] for r in rows_out) and summary["warnings"] == []


def test_sandbox_errors_are_flagged_not_hidden() -> None:
    from collections import Counter

    from tunelab.evaluate.runner import _warnings

    assert _warnings(Counter({"passed": 3, "failed": 1})) == []
    (w,) = _warnings(Counter({"sandbox_error": 2, "failed": 2}))
    assert "2 of 4" in w and "lower bound" in w


def test_codetasks_reads_builtin_chat_rows_and_skips_trained_rows() -> None:
    """The quickstart's held-out check: builtin rows 181-200 as code tasks; their reference answers pass."""
    import json

    from tunelab.data.sources import resolve
    from tunelab.evaluate.sandbox import execute_many
    from tunelab.evaluate.tasks import TASKS

    cfg = TASKS.config_class("codetasks")(name="codetasks", path="builtin:code_instructions", skip=180)
    task = TASKS.get("codetasks")(cfg, chat_template=True)
    problems = task.problems()
    assert [p.id for p in problems] == [f"tl-{i:03d}" for i in range(181, 201)]
    lines = Path(resolve("builtin:code_instructions")).read_text().splitlines()
    rows = {r["id"]: r for r in map(json.loads, lines)}
    answers = [rows[p.id]["messages"][-1]["content"] for p in problems]
    runs = execute_many([task.program(p, a) for p, a in zip(problems, answers, strict=True)])
    assert all(r.passed for r in runs), [r.reason for r in runs if not r.passed][:2]
    wrong = execute_many([task.program(problems[0], "```python\ndef pad_right(items, n, fill=None):\n    return items\n```")])
    assert not wrong[0].passed
