"""`tunelab data gold`: a task's problems with their reference answers as SFT rows, in the task's own prompt.

What must hold for fine-tuning on a benchmark's training split to mean anything: the row's prompt is exactly
what evaluation shows the model (same text, same tokens), the target is what the task's own judge accepts
(executed here in the sandbox, after the cut the engine makes at the stop string), and the target ends where
generation should end (few-shot MBPP: "[DONE]").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MBPP_FILE, needs_mbpp

from tunelab.data.build_gold import gold_rows, write_gold
from tunelab.data.formats import detect_format, to_example
from tunelab.data.templating import encode
from tunelab.errors import UserError
from tunelab.evaluate.sandbox import execute_many
from tunelab.evaluate.tasks import TASKS
from tunelab.evaluate.tasks._base import Problem

MBPP = MBPP_FILE
pytestmark = needs_mbpp


def _task(name: str, mode: str, **fields: object):  # noqa: ANN202
    cfg = TASKS.parse({"name": name, "prompt_mode": mode, **fields}, "t")
    return TASKS.get(name)(cfg, chat_template=True)  # type: ignore[attr-defined]


def _mbpp(mode: str, split: str = "train", limit: int | None = None):  # noqa: ANN202
    return _task("mbpp", mode, path=str(MBPP), split=split, limit=limit)


def test_fewshot_rows_are_the_eval_prompt_and_the_reference_ending_in_done() -> None:
    task = _mbpp("fewshot")
    rows, stats = gold_rows(task, split="train")
    assert stats == {"problems": 374, "rows": 374, "no_reference": 0}
    by_id = {p.id: p for p in task.problems()}
    for r in rows:
        p = by_id[r["problem_id"]]
        assert set(r) == {"prompt", "completion", "problem_id", "split"} and r["split"] == "train"
        assert r["prompt"] == task.prompt(p)  # the 3-shot prefix included, ending in "[BEGIN]\n"
        assert r["completion"] == p.reference.strip("\n") + "\n[DONE]"
        assert r["completion"].count("[DONE]") == 1
    assert [r["problem_id"] for r in rows] == [str(i) for i in range(601, 975)]


def test_chat_rows_are_the_eval_turns_plus_a_fenced_answer() -> None:
    task = _mbpp("chat", split="validation")
    rows, stats = gold_rows(task)
    assert stats["rows"] == 90 and all("split" not in r for r in rows)
    p = task.problems()[0]
    msgs = rows[0]["messages"]
    assert msgs[:-1] == task.prompt(p)
    assert msgs[-1] == {"role": "assistant", "content": f"```python\n{p.reference.strip(chr(10))}\n```"}


@pytest.mark.parametrize("mode", ["chat", "fewshot"])
def test_targets_pass_the_tasks_own_judge_in_the_sandbox(mode: str) -> None:
    """The target, cut where the engine cuts generation, becomes a program that passes the problem's tests."""
    task = _mbpp(mode, limit=6)
    rows, _ = gold_rows(task)
    problems = {p.id: p for p in task.problems()}
    programs = []
    for r in rows:
        answer = r["messages"][-1]["content"] if mode == "chat" else r["completion"]
        for stop in task.stop():  # the engine returns the text before the first stop string
            answer = answer.split(stop)[0]
        programs.append(task.program(problems[r["problem_id"]], answer)[0])
    results = execute_many(programs, timeout=10.0)
    assert [res.status for res in results] == ["passed"] * len(rows)
    # negative control: the same judge rejects a target with its body removed
    broken = task.program(problems[rows[0]["problem_id"]], "def nothing():\n    pass\n")[0]
    assert execute_many([broken], timeout=10.0)[0].status != "passed"


def test_raw_training_tokens_start_with_exactly_the_eval_prompt_tokens() -> None:
    from tunelab.config import ModelConfig
    from tunelab.generate.engine import Engine
    from tunelab.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(name="tiny-llama"))
    task = _mbpp("fewshot", limit=2)
    rows, _ = gold_rows(task)
    engine = Engine.__new__(Engine)  # only its prompt encoding is used: no model, no backend
    engine.tokenizer = tok
    for r in rows:
        enc = encode(tok, to_example(r, detect_format(r, "row"), "row"), template="raw", loss_on="assistant")
        prompt_ids = engine.encode(r["prompt"])
        assert enc.input_ids[: len(prompt_ids)] == prompt_ids
        assert all(lab == -100 for lab in enc.labels[: len(prompt_ids)])  # no loss on the prompt
        assert all(lab != -100 for lab in enc.labels[len(prompt_ids):])  # loss on the whole answer and EOS


def test_humaneval_completion_target_continues_the_prompt() -> None:
    task = _task("humaneval", "completion", limit=3)
    rows, _ = gold_rows(task)
    for r, p in zip(rows, task.problems(), strict=True):
        assert r["prompt"] == p.prompt and r["prompt"] + r["completion"] == p.reference
    chat = _task("humaneval", "chat", limit=1)
    assert gold_rows(chat)[0][0]["messages"][-1]["content"].startswith("```python\n" + chat.problems()[0].reference.strip("\n")[:20])


def test_problems_without_reference_are_counted_and_an_empty_result_refused(tmp_path: Path) -> None:
    task = _mbpp("chat", limit=3)
    problems = task.problems()
    problems[1].reference = None
    task.problems = lambda: problems  # type: ignore[method-assign]
    rows, stats = gold_rows(task)
    assert stats == {"problems": 3, "rows": 2, "no_reference": 1}
    for p in problems:
        p.reference = None
    with pytest.raises(UserError, match="none of the selected problems has a reference"):
        write_gold([("train", task)], tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_write_refuses_a_split_given_twice(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="same split was given twice"):
        write_gold([("train", _mbpp("chat", limit=2)), ("train", _mbpp("chat", limit=2))], tmp_path / "x.jsonl")


def test_problem_reference_none_target_none() -> None:
    assert _mbpp("fewshot").training_target(Problem("1", "x", reference=None)) is None


def test_cli_writes_a_file_the_trainer_loads(tmp_path: Path) -> None:
    out = tmp_path / "gold.jsonl"
    cmd = [sys.executable, "-m", "tunelab.cli", "data", "gold", "--data", str(MBPP), "--split", "train", "--split",
           "validation", "--prompt-mode", "fewshot", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["rows"] == 464 and stats["format"] == "prompt_completion" and stats["splits"]["validation"]["rows"] == 90
    from tunelab.data.sources import read_rows

    rows = [row for _, row in read_rows(str(out))]
    assert len(rows) == 464 and {detect_format(r, "row") for r in rows} == {"prompt_completion"}
    bad = subprocess.run([*cmd[:-4], "--prompt-mode", "auto", "--out", str(out)], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "auto depends on a model's tokenizer" in bad.stderr and "Traceback" not in bad.stderr
