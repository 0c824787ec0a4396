"""Checks the preference sets derived from code_instructions.jsonl (src/tunelab/data/builtin/derive.py).

Every row is checked for its shape and for being made from its source task; five rows per file (spread
over the file, both labels and all three rotations of the ranked responses included) are executed in
tunelab's sandbox, one program per test, to confirm the recorded outcomes: chosen passes and rejected
fails, ranked scores are the fraction of tests passed, unpaired labels say whether all tests pass.
About 45 distinct sandboxed programs, a few seconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tunelab.data.builtin.derive import KINDS, program, score
from tunelab.evaluate.sandbox import execute_many

BUILTIN = Path(__file__).resolve().parents[2] / "src" / "tunelab" / "data" / "builtin"
FENCE = re.compile(r"```python\n(.*?)\n```", re.S)
SAMPLE = (0, 41, 82, 123, 164)  # rows run in the sandbox: i % 3 covers 0, 1, 2 and i % 2 both labels
KEYS = {
    "code_pairs.jsonl": {"id", "prompt", "chosen", "rejected", "mutation", "entry_point", "tests"},
    "code_ranked.jsonl": {"id", "prompt", "responses", "scores", "mutations", "entry_point", "tests"},
    "code_unpaired.jsonl": {"id", "prompt", "completion", "label", "mutation", "entry_point", "tests"},
    "code_multi_target.jsonl": {"id", "prompt", "targets", "entry_point", "tests"},
}


def _load(name: str) -> list[dict]:
    with (BUILTIN / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


SOURCE = {r["id"]: r for r in _load("code_instructions.jsonl")}
DATA = {name: _load(name) for name in KEYS}


def _reference(row: dict) -> str:
    return SOURCE[row["id"]]["messages"][1]["content"]


def _outside_code(answer: str) -> tuple[str, str]:
    m = FENCE.search(answer)
    assert m is not None, "no ```python block"
    return answer[: m.start(1)], answer[m.end(1):]


def _same_but_code(variant: str, reference: str) -> None:
    """A broken variant differs from the reference only inside the code fence."""
    assert variant != reference
    assert _outside_code(variant) == _outside_code(reference)


@pytest.mark.parametrize("name", sorted(KEYS))
def test_file_parses_with_expected_keys(name: str) -> None:
    rows = DATA[name]
    assert len(rows) >= 150, f"{name}: only {len(rows)} rows"
    ids = [r["id"] for r in rows]
    assert ids == sorted(set(ids)) and set(ids) <= set(SOURCE)
    for r in rows:
        assert set(r) == KEYS[name], r["id"]
        src = SOURCE[r["id"]]
        assert r["prompt"] == src["messages"][0]["content"]
        assert r["entry_point"] == src["entry_point"] and r["tests"] == src["tests"]


def test_files_cover_the_same_tasks() -> None:
    assert len({tuple(r["id"] for r in rows) for rows in DATA.values()}) == 1


def test_pairs() -> None:
    for r in DATA["code_pairs.jsonl"]:
        assert r["chosen"] == _reference(r)
        assert r["chosen"] != r["rejected"]
        _same_but_code(r["rejected"], r["chosen"])
        assert r["mutation"] in KINDS


def test_ranked() -> None:
    positions = set()
    for i, r in enumerate(DATA["code_ranked.jsonl"]):
        responses, scores, kinds = r["responses"], r["scores"], r["mutations"]
        assert len(responses) == len(scores) == len(kinds) == 3
        assert len(set(responses)) == 3
        ref = responses.index(_reference(r))
        assert ref == (-i) % 3  # [reference, A, B] rotated left by i
        positions.add(ref)
        assert scores[ref] == 1.0 and kinds[ref] is None
        for j in range(3):
            assert isinstance(scores[j], float) and 0.0 <= scores[j] <= 1.0
            if j != ref:
                assert scores[j] < 1.0 and kinds[j] in KINDS
                _same_but_code(responses[j], responses[ref])
    assert positions == {0, 1, 2}


def test_unpaired() -> None:
    rows = DATA["code_unpaired.jsonl"]
    pairs = {r["id"]: r for r in DATA["code_pairs.jsonl"]}
    for i, r in enumerate(rows):
        assert r["label"] is (i % 2 == 0)
        if r["label"]:
            assert r["completion"] == _reference(r) and r["mutation"] is None
        else:
            assert r["completion"] == pairs[r["id"]]["rejected"] and r["mutation"] in KINDS
            _same_but_code(r["completion"], _reference(r))


@pytest.fixture(scope="module")
def executed() -> dict[tuple[str, str], bool]:
    """(answer, test) -> passed, for every answer in the sampled rows."""
    answers: list[tuple[str, list[str]]] = []
    for i in SAMPLE:
        p, k, u = (DATA[n][i] for n in ("code_pairs.jsonl", "code_ranked.jsonl", "code_unpaired.jsonl"))
        answers += [(p["chosen"], p["tests"]), (p["rejected"], p["tests"]), (u["completion"], u["tests"])]
        answers += [(resp, k["tests"]) for resp in k["responses"]]
    jobs = sorted({(a, t) for a, tests in answers for t in tests})
    results = execute_many([program(FENCE.search(a).group(1), t) for a, t in jobs], timeout=5.0)
    return {job: r.passed for job, r in zip(jobs, results, strict=True)}


def _passes(executed: dict[tuple[str, str], bool], answer: str, tests: list[str]) -> list[bool]:
    return [executed[(answer, t)] for t in tests]


@pytest.mark.parametrize("i", SAMPLE)
def test_sample_pairs_execute(executed: dict, i: int) -> None:
    r = DATA["code_pairs.jsonl"][i]
    assert all(_passes(executed, r["chosen"], r["tests"])), r["id"]
    assert not all(_passes(executed, r["rejected"], r["tests"])), r["id"]


@pytest.mark.parametrize("i", SAMPLE)
def test_sample_ranked_scores_execute(executed: dict, i: int) -> None:
    r = DATA["code_ranked.jsonl"][i]
    assert [score(_passes(executed, resp, r["tests"])) for resp in r["responses"]] == r["scores"], r["id"]


@pytest.mark.parametrize("i", SAMPLE)
def test_sample_unpaired_labels_execute(executed: dict, i: int) -> None:
    r = DATA["code_unpaired.jsonl"][i]
    assert all(_passes(executed, r["completion"], r["tests"])) is r["label"], r["id"]


def test_multi_target_rows_are_the_solution_and_its_tests() -> None:
    for p, m in zip(DATA["code_pairs.jsonl"], DATA["code_multi_target.jsonl"], strict=True):
        assert m["prompt"] == p["prompt"] and m["targets"][0] == p["chosen"]
        assert m["targets"][1] == "```python\n" + "\n".join(p["tests"]) + "\n```"
