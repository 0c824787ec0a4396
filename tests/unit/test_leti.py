"""LeTI: the "feedback" batcher (prefix layout, labels, errors), the objective (== SFT token loss), the row
builder from judged samples, the builtin code_feedback set, and a `tunelab data feedback` CLI smoke."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import IM_END, write_jsonl

from tunelab.config import DataConfig
from tunelab.data import tokenize_cached
from tunelab.data.batching import get_batcher
from tunelab.data.batching._base import EncodeContext
from tunelab.data.batching.feedback import BAD, FEEDBACK_CLOSE, FEEDBACK_OPEN, GOOD, prefix_text
from tunelab.data.build_feedback import feedback_text, prompt_text, rows_from_samples
from tunelab.data.builtin.derive import FEEDBACK, HERE, feedback_rows
from tunelab.data.templating import IGNORE
from tunelab.errors import UserError
from tunelab.evaluate.tasks._base import Problem
from tunelab.objectives import OBJECTIVES
from tunelab.objectives._logprobs import label_logits
from tunelab.objectives.sft import sft_loss

PROMPT = "Write add(a, b) returning a + b."
ATTEMPT = "def add(a, b):\n    return a - b"
ERROR = "failed: assertion failed at line 3: `assert add(1, 2) == 3`"


def _encode(tok: Any, row: dict[str, Any], template: str, **cfg: Any) -> Any:
    ctx = EncodeContext(tok, DataConfig(train="x.jsonl", **cfg), template)
    return get_batcher("feedback").encode(row, "rows.jsonl:1", ctx)


def _split(tok: Any, unit: Any) -> tuple[str, str]:
    """(decoded labelled tokens, decoded whole sequence)."""
    seq = unit.seqs[0]
    learnt = [t for t in seq.labels if t != IGNORE]
    return tok.decode(learnt), tok.decode(seq.input_ids)


def _row(reward: Any, feedback: Any = ERROR, **kw: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "attempt": ATTEMPT, "reward": reward, "feedback": feedback, **kw}


# ------------------------------------------------------------------------------------------- batcher


def test_prefix_text() -> None:
    assert prefix_text(True) == GOOD + "\n"
    assert prefix_text(True, ERROR) == GOOD + "\n"  # feedback only on failures
    assert prefix_text(False) == BAD + "\n"
    assert prefix_text(False, "  ") == BAD + "\n"
    assert prefix_text(False, ERROR) == f"{BAD}{FEEDBACK_OPEN}{ERROR}{FEEDBACK_CLOSE}\n"


def test_chat_bad_row_learns_the_attempt_only(tok: Any) -> None:
    unit = _encode(tok, _row(False), "chat")
    learnt, full = _split(tok, unit)
    assert learnt == ATTEMPT + IM_END  # the assistant turn and its end-of-turn token, nothing else
    # the prefix opens the user turn, the problem follows it
    assert f"{BAD}{FEEDBACK_OPEN}{ERROR}{FEEDBACK_CLOSE}\n{PROMPT}" in full
    assert unit.meta == {"reward": False}


def test_chat_good_row_has_no_feedback_span(tok: Any) -> None:
    unit = _encode(tok, _row(True), "chat")  # feedback given but reward true: not shown
    learnt, full = _split(tok, unit)
    assert learnt == ATTEMPT + IM_END
    assert f"{GOOD}\n{PROMPT}" in full and FEEDBACK_OPEN not in full and ERROR not in full
    assert unit.meta == {"reward": True}


def test_raw_labels_cover_prompt_and_attempt(tok: Any) -> None:
    for reward, prefix in ((False, prefix_text(False, ERROR)), (True, prefix_text(True))):
        unit = _encode(tok, _row(reward), "raw")
        seq = unit.seqs[0]
        n_prefix = seq.labels.index(next(t for t in seq.labels if t != IGNORE))
        assert all(t == IGNORE for t in seq.labels[:n_prefix])
        assert all(t != IGNORE for t in seq.labels[n_prefix:])  # everything after the prefix is learnt
        assert tok.decode(seq.input_ids[:n_prefix]) == prefix
        learnt, full = _split(tok, unit)
        assert learnt == PROMPT + ATTEMPT + tok.eos_token
        assert GOOD not in learnt and BAD not in learnt and FEEDBACK_OPEN not in learnt
        assert full == prefix + PROMPT + ATTEMPT + tok.eos_token


def test_bad_row_without_feedback_is_the_binary_marker(tok: Any) -> None:
    for feedback in ("", None):
        _, full = _split(tok, _encode(tok, _row(0, feedback), "raw"))
        assert full.startswith(BAD + "\n" + PROMPT) and FEEDBACK_OPEN not in full


def test_chat_message_prompt_and_system_prompt(tok: Any) -> None:
    prompt = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": PROMPT}]
    learnt, full = _split(tok, _encode(tok, _row(False, prompt=prompt), "chat"))
    assert learnt == ATTEMPT + IM_END
    assert full.index("Be terse.") < full.index(BAD + FEEDBACK_OPEN) < full.index(PROMPT)
    learnt, _ = _split(tok, _encode(tok, _row(True), "raw", system_prompt="Be terse."))
    assert learnt == PROMPT + ATTEMPT + tok.eos_token  # system text is context, not learnt


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": PROMPT, "attempt": ATTEMPT, "reward": True},
     "rows.jsonl:2: missing field 'feedback' for feedback data (rows need: prompt, attempt, feedback, reward; found: attempt, prompt, reward)"),
    (_row(2), "rows.jsonl:2: 'reward' must be true (all tests passed) or false (0/1 also work), got 2"),
    (_row("maybe"), "rows.jsonl:2: 'reward' must be true (all tests passed) or false (0/1 also work), got 'maybe'"),
    (_row(False, ["failed"]), "rows.jsonl:2: 'feedback' must be a string (the execution feedback; may be empty), got list"),
    (_row(False, attempt=""), "rows.jsonl:2: field 'attempt' is empty"),
    (_row(False, prompt=[{"role": "system", "content": "hi"}]), "rows.jsonl:2: 'prompt' has no user turn to carry the reward marker"),
])
def test_malformed_rows_name_file_and_line(row: dict[str, Any], message: str, tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [_row(True), row])
    with pytest.raises(UserError) as e:
        tokenize_cached(str(path), tok, DataConfig(train=str(path), max_length=256, template="chat"), "train", "feedback")
    assert str(e.value) == f"{tmp_path}/{message}"
    assert "\n" not in str(e.value)


def test_reward_forms(tok: Any) -> None:
    for value, want in ((True, True), (1, True), (1.0, True), ("true", True), (False, False), (0, False), ("0", False)):
        assert _encode(tok, _row(value), "raw").meta["reward"] is want


# ------------------------------------------------------------------------------------------- objective


def test_objective_equals_sft_loss(tok: Any, make_model: Any, tmp_path: Path) -> None:
    rows = [_row(i % 2 == 0, "" if i == 3 else ERROR, attempt=f"def add(a, b):\n    return a {'+-*'[i % 3]} b") for i in range(5)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    units = tokenize_cached(str(path), tok, DataConfig(train=str(path), max_length=256), "train", "feedback").samples
    batcher = get_batcher("feedback")
    cls = OBJECTIVES.get("leti")
    obj = cls(cls.Config())
    assert cls.batch_format == "feedback" and not cls.needs_reference
    model = make_model()
    for packed in (False, True):
        batch = batcher.collate([units[:2], units[2:]] if packed else [[u] for u in units], tok.pad_token_id, packed)
        assert batch["reward"].tolist() == [True, False, True, False, True]
        n = obj.num_items(batch)
        assert n == int((batch["labels"] != IGNORE).sum())  # tokens, as for SFT
        with torch.no_grad():
            loss, metrics = obj.loss(model, batch, n)
            logits, labels = label_logits(model, batch)
            want = sft_loss(logits, labels, n)
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
        assert metrics == {"tokens": float(n), "good_fraction": pytest.approx(0.6)}


# ------------------------------------------------------------------------------------------- row builder


class _FakeTask:
    def __init__(self, chat: bool) -> None:
        self.chat = chat

    def prompt(self, p: Problem) -> Any:
        return [{"role": "user", "content": f"task {p.id}"}] if self.chat else f"# task {p.id}\n"


def _sample(pid: str, i: int, passed: bool, status: str = "failed", reason: str = "AssertionError", text: str = "code") -> dict[str, Any]:
    return {"problem_id": pid, "sample": i, "completion": f"{text}-{pid}-{i}" if text else "  ",
            "passed": passed, "status": "passed" if passed else status, "reason": "all statements ran" if passed else reason}


def _samples() -> list[dict[str, Any]]:
    return [_sample("b", 1, False, "error", "NameError: name 'x' is not defined"), _sample("a", 1, False),
            _sample("a", 0, True), _sample("b", 0, False, "timeout", ""), _sample("b", 2, False, text=""),
            _sample("b", 3, False, "sandbox_error", "the sandbox did not start"), _sample("c", 0, True)]


def test_rows_from_samples() -> None:
    problems = [Problem("a", "A"), Problem("b", "B"), Problem("c", "C")]
    rows, stats = rows_from_samples(_FakeTask(chat=True), problems, _samples())  # type: ignore[arg-type]
    assert [(r["problem_id"], r["sample"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0)]
    assert [r["reward"] for r in rows] == [True, False, False, False, True]
    assert [r["feedback"] for r in rows] == ["", "failed: AssertionError", "timeout", "error: NameError: name 'x' is not defined", ""]
    assert rows[0] == {"prompt": "task a", "attempt": "code-a-0", "reward": True, "feedback": "", "problem_id": "a",
                       "sample": 0, "status": "passed"}
    assert stats == {"problems": 3, "samples": 7, "good": 2, "bad": 3, "skipped_empty": 1, "skipped_sandbox_error": 1,
                     "problems_all_pass": 1, "problems_none_pass": 1}
    coarse, _ = rows_from_samples(_FakeTask(chat=False), problems, _samples(), coarse=True)  # type: ignore[arg-type]
    assert [r["feedback"] for r in coarse] == [""] * 5 and [r["reward"] for r in coarse] == [r["reward"] for r in rows]
    assert coarse[0]["prompt"] == "# task a\n"


def test_prompt_and_feedback_text() -> None:
    assert prompt_text("raw text") == "raw text"
    assert prompt_text([{"role": "user", "content": "q"}]) == "q"
    multi = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert prompt_text(multi) == multi  # more than one turn: kept as messages (the batcher takes them)
    assert feedback_text("failed", " AssertionError \n") == "failed: AssertionError"
    assert feedback_text("timeout", "") == "timeout"


def test_builder_rows_encode(tok: Any, tmp_path: Path) -> None:
    rows, _ = rows_from_samples(_FakeTask(chat=True), [Problem("a", "A")], _samples())  # type: ignore[arg-type]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    units = tokenize_cached(str(path), tok, DataConfig(train=str(path), max_length=256), "train", "feedback").samples
    assert [u.meta["reward"] for u in units] == [True, False]


# ------------------------------------------------------------------------------------------- builtin set


def test_builtin_code_feedback_is_derived_from_the_pairs() -> None:
    def load(name: str) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in (HERE / name).read_text(encoding="utf-8").splitlines() if ln.strip()]

    rows, pairs = load("code_feedback.jsonl"), load("code_pairs.jsonl")
    assert rows == feedback_rows(pairs) and len(rows) == 2 * len(pairs) == 400
    assert all(r["reward"] == (i % 2 == 0) and r["feedback"] == ("" if i % 2 == 0 else FEEDBACK) for i, r in enumerate(rows))


# ------------------------------------------------------------------------------------------- CLI

MBPP_ROWS = [
    {"task_id": 601, "text": "Write a function add_one(x) that returns x plus one.",
     "code": "def add_one(x):\r\n    return x + 1", "test_list": ["assert add_one(1) == 2", "assert add_one(-1) == 0"]},
    {"task_id": 602, "text": "Write a function double(x) that returns twice x.",
     "code": "def double(x):\r\n    return 2 * x", "test_list": ["assert double(3) == 6", "assert double(0) == 0"]},
    {"task_id": 603, "text": "Write a function negate(x) that returns minus x.",
     "code": "def negate(x):\r\n    return -x", "test_list": ["assert negate(3) == -3", "assert negate(0) == 0"]},
]


def test_cli_feedback_smoke(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, "-c", "from tunelab.cli import main; main()", "data", "feedback", "tiny-llama", "--task", "mbpp",
           "--data", str(data), "--split", "train", "--limit", "2", "--k", "2", "--max-new-tokens", "16", "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    stats = json.loads(r.stdout)
    assert stats["rows"] == len(rows) == stats["good"] + stats["bad"] and 0 < len(rows) <= 4
    assert {r["problem_id"] for r in rows} <= {"601", "602"}
    for row in rows:
        assert set(row) >= {"prompt", "attempt", "reward", "feedback"} and isinstance(row["reward"], bool)
        assert "Write a function" in row["prompt"] and (row["feedback"] == "") == row["reward"]
