"""Data builders: S3FT (model / paraphrase / gold targets) and R-Tuning (known/unknown split, suffixes, AP,
sure-confidence).

Generation is replaced by chosen completions (a fake `Engine.stream` / `Engine.generate`), so the tests check
the logic; code answers are still judged for real in the sandbox. The CLI is smoke-tested in subprocesses
with the tiny model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.data import build_rtuning as rt
from tunelab.data.build_s3ft import SOURCES, build_s3ft, compose, restate_prompt
from tunelab.errors import UserError
from tunelab.evaluate.tasks import TASKS
from tunelab.generate.engine import Completion, Engine, Generated, SamplingSettings

CLI = [sys.executable, "-c", "from tunelab.cli import main; main()"]

MBPP_ROWS = [
    {"task_id": 601, "text": "Write a function add_one(x) that returns x plus one.",
     "code": "def add_one(x):\r\n    return x + 1", "test_list": ["assert add_one(1) == 2", "assert add_one(-1) == 0"]},
    {"task_id": 602, "text": "Write a function double(x) that returns twice x.",
     "code": "def double(x):\r\n    return 2 * x", "test_list": ["assert double(3) == 6", "assert double(0) == 0"]},
    {"task_id": 603, "text": "Write a function negate(x) that returns minus x.",
     "code": "def negate(x):\r\n    return -x", "test_list": ["assert negate(3) == -3", "assert negate(0) == 0"]},
]
QA_ROWS = [
    {"question": "What is the capital of France?", "answer": "Paris"},
    {"question": "Who wrote Hamlet?", "answer": "William Shakespeare"},
    {"question": "What is the chemical symbol for gold?", "answer": "Au"},
    {"question": "How many legs does a spider have?", "answer": "eight"},
    {"question": "What planet is known as the Red Planet?", "answer": "Mars"},
    {"question": "What is the largest ocean on Earth?", "answer": "the Pacific Ocean"},
    {"question": "In which country is Kyoto?", "answer": "Japan"},
    {"question": "What gas do plants absorb from the air?", "answer": "carbon dioxide"},
    {"question": "Who painted the Mona Lisa?", "answer": "Leonardo da Vinci"},
    {"question": "What is the boiling point of water in Celsius?", "answer": "100"},
]


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _fence(code: str) -> str:
    return f"```python\n{code}\n```"


def _fake_stream(answer: Callable[[Any], str], seen: list[Any]) -> Callable[..., Iterator[list[Generated]]]:
    """An `Engine.stream` that answers each prompt with `answer(prompt)` and records the prompts it got."""

    def stream(self: Engine, prompts: Sequence[Any], settings: SamplingSettings) -> Iterator[list[Generated]]:
        seen.extend(prompts)
        yield [Generated(i, 0, Completion(answer(p), 5, "eos")) for i, p in enumerate(prompts)]

    return stream


def _mbpp_cfg(path: Path, **kw: Any) -> Any:
    return TASKS.parse({"name": "mbpp", "path": str(path), "split": "train", "max_new_tokens": 16, **kw}, "test")


# ----------------------------------------------------------------------------------------------- S3FT

GREEDY = {  # the model's own answers: right for 601, wrong for 602 and 603
    "add_one": "Sure!\n" + _fence("def add_one(x):\n    y = x + 1\n    return y"),
    "double": _fence("def double(x):\n    return x + 2"),
    "negate": _fence("def negate(x):\n    return x"),
}
RESTATED = {  # its restatements of the gold: right for 602, still wrong for 603
    "double": "In my words:\n" + _fence("def double(x):\n    return x + x"),
    "negate": _fence("def negate(x):\n    return abs(x)"),
}


def _code_answer(prompt: Any) -> str:
    text = prompt[-1]["content"]
    name = next(n for n in GREEDY if f"function {n}(" in text)
    return RESTATED[name] if "Here is a correct reference answer" in text else GREEDY[name]


def test_s3ft_takes_model_then_paraphrase_then_gold(
    tmp_path: Path, make_model: Callable[[], Any], tok: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(Engine, "stream", _fake_stream(_code_answer, seen))
    data = _write(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    out = tmp_path / "s3ft.jsonl"
    stats = build_s3ft(make_model(), tok, _mbpp_cfg(data), out, quiet=True)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["problem_id"], r["source"]) for r in rows] == [("601", "model"), ("602", "paraphrase"), ("603", "gold")]
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": GREEDY["add_one"]}  # verbatim, prose included
    assert rows[1]["messages"][-1]["content"] == RESTATED["double"]
    assert rows[2]["messages"][-1]["content"] == _fence("def negate(x):\n    return -x")  # the gold, CRLF gone
    task = TASKS.get("mbpp")(_mbpp_cfg(data), chat_template=True)
    for r, p in zip(rows, task.problems(), strict=True):
        assert r["messages"][:-1] == task.prompt(p)  # user turn = the task's own prompt, not the restate prompt
    assert stats["model"] == stats["paraphrase"] == stats["gold"] == 1 and stats["rows"] == 3
    assert stats["no_gold_skipped"] == 0 and stats["model_share"] == round(1 / 3, 4) and stats["paraphrasing"] is True
    # only the rejected problems were asked to restate, and their prompt shows the gold solution
    restates = [p for p in seen if "Here is a correct reference answer" in p[-1]["content"]]
    assert len(seen) == 5 and len(restates) == 2
    assert "def double(x):\n    return 2 * x" in restates[0][-1]["content"] + restates[1][-1]["content"]
    samples = out.with_name("s3ft_s3ft") / "eval" / "mbpp"
    assert (samples / "greedy" / "samples.jsonl").is_file() and (samples / "paraphrase" / "samples.jsonl").is_file()


def test_s3ft_without_paraphrase_falls_back_to_gold(
    tmp_path: Path, make_model: Callable[[], Any], tok: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(Engine, "stream", _fake_stream(_code_answer, seen))
    data = _write(tmp_path / "mbpp.jsonl", MBPP_ROWS[:2])
    stats = build_s3ft(make_model(), tok, _mbpp_cfg(data), tmp_path / "o.jsonl", paraphrase=False, quiet=True)
    assert (stats["model"], stats["paraphrase"], stats["gold"]) == (1, 0, 1)
    assert len(seen) == 2  # no restate pass at all


def test_s3ft_text_task_is_judged_by_its_metric(
    tmp_path: Path, make_model: Callable[[], Any], tok: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # question: (reference, greedy answer, restated answer)
    answers = {"capital of France": ("Paris", "Paris", "-"), "capital of Germany": ("Berlin", "Munich", "Berlin"),
               "capital of Italy": ("Rome", "Milan", "It is Rome.")}

    def answer(prompt: Any) -> str:
        text = prompt[-1]["content"]
        _, greedy, restated = next(v for k, v in answers.items() if k in text)
        return restated if "Here is a correct reference answer" in text else greedy

    monkeypatch.setattr(Engine, "stream", _fake_stream(answer, []))
    data = _write(tmp_path / "qa.jsonl", [{"prompt": f"What is the {k}?", "reference": v[0]} for k, v in answers.items()])
    cfg = TASKS.parse({"name": "generation", "path": str(data)}, "test")
    out = tmp_path / "o.jsonl"
    build_s3ft(make_model(), tok, cfg, out, quiet=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in rows] == ["model", "paraphrase", "gold"]  # exact_match rejects "It is Rome."
    assert [r["messages"][-1]["content"] for r in rows] == ["Paris", "Berlin", "Rome"]


def test_s3ft_needs_greedy_decoding(tmp_path: Path, make_model: Callable[[], Any], tok: Any) -> None:
    data = _write(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    with pytest.raises(UserError, match="greedy"):
        build_s3ft(make_model(), tok, _mbpp_cfg(data, temperature=0.5), tmp_path / "o.jsonl")


def test_compose_skips_rejected_problems_without_gold(tmp_path: Path) -> None:
    from tunelab.evaluate.tasks._base import Problem

    data = _write(tmp_path / "qa.jsonl", [{"prompt": "q", "reference": "a"}])
    task = TASKS.get("generation")(TASKS.parse({"name": "generation", "path": str(data)}, "t"), chat_template=True)
    problems = [Problem("a", "q1", references=[]), Problem("b", "q2", references=[])]
    rows, stats = compose(task, problems, {"a": ("yes", True), "b": ("no", False)}, {})
    assert [r["problem_id"] for r in rows] == ["a"] and stats["no_gold_skipped"] == 1 and stats["model"] == 1


def test_restate_prompt_keeps_the_task_prompt_and_shows_the_gold() -> None:
    chat = restate_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "Task?"}], "GOLD", code=True)
    assert chat[0] == {"role": "system", "content": "S"} and chat[1]["content"].startswith("Task?\n\n")
    assert "GOLD" in chat[1]["content"] and "```python code block" in chat[1]["content"]
    plain = restate_prompt("Q: x\nA:", "GOLD", code=False)
    assert isinstance(plain, str) and plain.endswith("Q: x\nA:") and "GOLD" in plain


# -------------------------------------------------------------------------------------------- R-Tuning


def test_known_means_gold_inside_the_answer_cut_at_the_first_period() -> None:
    assert rt.cut_answer(" Paris. It is in France.") == " Paris" and rt.cut_answer("no period") == "no period"
    assert rt.is_known(" paris, the city", "Paris")  # case is ignored
    assert not rt.is_known(" Lyon. Not Paris", "Paris")  # only the text before the first '.' counts
    assert not rt.is_known(" Mars", "Venus")


def _qas(n: int = 3) -> list[rt.QA]:
    return [rt.QA(r["question"], r["answer"], f"f:{i}") for i, r in enumerate(QA_ROWS[:n], 1)]


def test_unsure_variant_keeps_gold_and_adds_the_papers_suffix() -> None:
    rows, stats = rt.refusal_rows(_qas(), [" Paris. Yes", " Marlowe", " au"], "unsure")
    q = " Are you sure you accurately answered the question based on your internal knowledge?"
    assert rows[0] == {"prompt": "Question: What is the capital of France? Answer:",
                       "completion": f" Paris.{q} I am sure.", "known": True, "prediction": " Paris"}
    assert rows[1]["completion"] == f" William Shakespeare.{q} I am unsure." and rows[1]["known"] is False
    assert rows[2]["completion"].endswith(" I am sure.")
    assert stats == {"questions": 3, "known": 2, "unknown": 1}


def test_unknown_variant_replaces_unknown_answers_with_a_refusal() -> None:
    preds = [" Paris", " Marlowe", " Silver"]
    rows, stats = rt.refusal_rows(_qas(), preds, "unknown", seed=3)
    assert rows[0]["completion"] == " Paris."
    assert rows[1]["completion"][1:] in rt.REFUSALS and rows[2]["completion"][1:] in rt.REFUSALS
    assert rows[1]["completion"].startswith(" ") and "Are you sure" not in rows[1]["completion"]
    assert rt.refusal_rows(_qas(), preds, "unknown", seed=3)[0] == rows  # seeded
    assert stats["known"] == 1 and stats["unknown"] == 2


def test_build_rtuning_uses_greedy_raw_prompts_and_cuts(
    tmp_path: Path, make_model: Callable[[], Any], tok: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    got: dict[str, Any] = {}

    def generate(self: Engine, prompts: Sequence[Any], settings: SamplingSettings) -> list[list[Completion]]:
        got["prompts"], got["settings"] = list(prompts), settings
        return [[Completion(t, 3, "stop")] for t in [" PARIS is big", " Marlowe. William Shakespeare"]]

    monkeypatch.setattr(Engine, "generate", generate)
    data = _write(tmp_path / "qa.jsonl", QA_ROWS)
    out = tmp_path / "rows.jsonl"
    stats = rt.build_rtuning(make_model(), tok, data, out, limit=2)
    assert got["prompts"] == ["Question: What is the capital of France? Answer:", "Question: Who wrote Hamlet? Answer:"]
    s = got["settings"]
    assert s.greedy and s.max_new_tokens == 15 and s.n == 1 and "." in s.stop
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["known"] for r in rows] == [True, False]  # the second names the gold only after the '.'
    assert stats == {"questions": 2, "known": 1, "unknown": 1, "variant": "unsure", "out": str(out)}


def test_load_qa_names_the_bad_line(tmp_path: Path) -> None:
    bad = _write(tmp_path / "qa.jsonl", [QA_ROWS[0], {"question": "q", "answer": 3}])
    with pytest.raises(UserError, match=r"qa\.jsonl:2: 'answer' must be a non-empty string"):
        rt.load_qa(bad)
    with pytest.raises(UserError, match=r"qa2\.jsonl:1: malformed JSON"):
        rt.load_qa(_write(tmp_path / "qa2.jsonl", ["{not json"]))


def test_ap_score_by_hand() -> None:
    # ranked: T(.9) F(.8) T(.7) F(.6); thresholds give (P, R) = (1, 1/2), (1/2, 1/2), (2/3, 1), (1/2, 1)
    # AP = (1/2 - 0) * 1 + 0 * 1/2 + (1 - 1/2) * 2/3 + 0 * 1/2 = 1/2 + 1/3
    assert rt.ap_score([True, False, True, False], [0.9, 0.8, 0.7, 0.6]) == pytest.approx(5 / 6)
    # tied confidences enter together: {T, F} at .5 -> (P, R) = (1/2, 1/2); then T at .2 -> (2/3, 1)
    # AP = 1/2 * 1/2 + 1/2 * 2/3 = 1/4 + 1/3
    assert rt.ap_score([True, False, True], [0.5, 0.5, 0.2]) == pytest.approx(7 / 12)
    assert rt.ap_score([False, True], [0.9, 0.1]) == pytest.approx(0.5)
    assert rt.ap_score([True, True], [0.1, 0.2]) == 1.0
    with pytest.raises(ValueError, match="no correct"):
        rt.ap_score([False], [0.3])
    with pytest.raises(ValueError):
        rt.ap_score([True], [0.3, 0.4])


def test_sure_confidence_is_a_softmax_over_the_two_token_logits(make_model: Callable[[], Any], tok: Any) -> None:
    model = make_model()
    text = "Question: What is the capital of France? Answer: Paris."
    got = rt.sure_confidence(model, tok, text)
    context = text + " Are you sure you accurately answered the question based on your internal knowledge? I am"
    ids = tok(context)["input_ids"]
    sure = tok(context + " sure")["input_ids"][len(ids)]
    unsure = tok(context + " unsure")["input_ids"][len(ids)]
    assert sure != unsure
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    ls, lu = float(logits[sure]), float(logits[unsure])
    assert got == pytest.approx(math.exp(ls) / (math.exp(ls) + math.exp(lu)), abs=1e-6)
    assert 0.0 < got < 1.0


# ------------------------------------------------------------------------------------------------ CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_cli_s3ft_smoke(tmp_path: Path) -> None:
    data = _write(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    out = tmp_path / "rows.jsonl"
    r = _cli("data", "s3ft", "tiny-llama", "--task", "mbpp", "--data", str(data), "--split", "train",
             "--out", str(out), "--limit", "2", "--max-new-tokens", "8", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(row["source"] in SOURCES for row in rows)
    assert all(row["messages"][-1]["role"] == "assistant" for row in rows)
    stats = json.loads(r.stdout)
    assert stats["model"] + stats["paraphrase"] + stats["gold"] == 2


def test_cli_refusal_aware_smoke(tmp_path: Path) -> None:
    data = _write(tmp_path / "qa.jsonl", QA_ROWS)
    out = tmp_path / "rows.jsonl"
    r = _cli("data", "refusal-aware", "tiny-llama", "--data", str(data), "--out", str(out), "--limit", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(row["completion"].endswith((" I am sure.", " I am unsure.")) for row in rows)
    assert json.loads(r.stdout)["questions"] == 2


def test_cli_malformed_inputs_are_one_line_exit_2(tmp_path: Path) -> None:
    qa = _write(tmp_path / "qa.jsonl", [QA_ROWS[0], {"question": "no answer"}])
    r = _cli("data", "refusal-aware", "tiny-llama", "--data", str(qa), "--out", str(tmp_path / "o.jsonl"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"{qa}:2:" in r.stderr
    mbpp = _write(tmp_path / "mbpp.jsonl", [MBPP_ROWS[0], {"task_id": 602, "text": "no code"}])
    r = _cli("data", "s3ft", "tiny-llama", "--data", str(mbpp), "--out", str(tmp_path / "o.jsonl"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"{mbpp}:2:" in r.stderr
