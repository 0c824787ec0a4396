"""Derive the builtin preference sets from ``code_instructions.jsonl`` by mutating reference solutions.

Run ``python -m tunelab.data.builtin.derive`` to rewrite, next to ``code_instructions.jsonl``:

* ``code_pairs.jsonl`` (pairwise: ``prompt``, ``chosen`` = the reference answer, ``rejected`` = a broken
  variant);
* ``code_ranked.jsonl`` (ranked, for RRHF: ``responses`` = the reference and two broken variants, rotated
  by row index, ``scores`` = the fraction of the task's tests each response passes);
* ``code_unpaired.jsonl`` (unpaired, for KTO: one row per task, the reference with ``label`` true on even
  rows and a broken variant with ``label`` false on odd rows);
* ``code_multi_target.jsonl`` (multi-target SFT: ``targets`` = [the reference answer, the task's unit tests
  as a fenced block]).
* ``code_feedback.jsonl`` (feedback, for LeTI: each pair as two rows, ``attempt`` = the reference with
  ``reward`` true and empty ``feedback``, then variant A with ``reward`` false and ``feedback`` =
  ``FEEDBACK``).

A broken variant is the reference answer with one small edit to the code inside its ```python fence
(everything else, the fence and any sentence after it included, is kept byte for byte). The edits
(`KINDS`) are found with `ast` and applied as text splices at the nodes' source positions, so the rest
of the code keeps its formatting. Each task's candidate edits are ordered deterministically (kinds
rotated by task index and interleaved, each kind's edits shuffled by a `random.Random` seeded with the
task id and kind) and run, one test per program, in tunelab's sandbox
(`tunelab.evaluate.sandbox.execute_many`). The first candidate that fails at least one test becomes
variant A, the first failing one of another kind variant B. Candidates whose runs time out, hit a
limit or are killed are never used, so every verdict is a plain pass, failed assert or exception and the
output does not depend on machine speed. The references and the chosen variants are then run a second
time; a variant whose verdicts change (e.g. set-order dependent) is dropped and the search goes on. A
task without two usable failing variants is skipped and counted. A reference that fails is an error.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.evaluate.sandbox import ExecutionResult, execute_many

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "code_instructions.jsonl"
OUTPUTS = {"pairs": "code_pairs.jsonl", "ranked": "code_ranked.jsonl", "unpaired": "code_unpaired.jsonl",
           "multi_target": "code_multi_target.jsonl", "feedback": "code_feedback.jsonl"}
FENCE = re.compile(r"```python\n(.*?)\n```", re.S)
KINDS = ("flip_comparison", "off_by_one", "swap_arithmetic", "flip_boolean", "swap_call", "edit_string",
         "replace_return", "drop_line")
TIMEOUT_S = 3.0  # per program; the references finish in milliseconds
WAVE = 3  # candidates tried per task and round
USABLE = {"passed", "failed", "error"}  # verdicts that do not depend on speed or host limits
FEEDBACK = "failed: AssertionError"  # the fixed feedback of code_feedback.jsonl's failing rows (see feedback_rows)

_CMP_SWAP: dict[type, tuple[str, str]] = {  # op -> (regex for its text, replacement)
    ast.LtE: (r"<=", "<"), ast.GtE: (r">=", ">"), ast.Lt: (r"<", "<="), ast.Gt: (r">", ">="),
    ast.Eq: (r"==", "!="), ast.NotEq: (r"!=", "=="), ast.NotIn: (r"\bnot\s+in\b", "in"),
    ast.In: (r"\bin\b", "not in"), ast.IsNot: (r"\bis\s+not\b", "is"), ast.Is: (r"\bis\b", "is not"),
}
_ARITH_SWAP: dict[type, tuple[str, str]] = {
    ast.Add: (r"\+", "-"), ast.Sub: (r"-", "+"), ast.Mult: (r"\*", "//"), ast.FloorDiv: (r"//", "*"),
    ast.Mod: (r"%", "//"),
}
_RETURN_DEFAULTS = {"int": "0", "float": "0.0", "str": '""', "list": "[]", "dict": "{}", "set": "set()",
                    "tuple": "()", "bytes": 'b""'}
_ATOMIC = (ast.Name, ast.Call, ast.Attribute, ast.Subscript, ast.Constant)
_SWAP_NAMES = {"min": "max", "max": "min", "any": "all", "all": "any"}
_SWAP_METHODS = {"lower": "upper", "upper": "lower", "startswith": "endswith", "endswith": "startswith",
                 "ljust": "rjust", "rjust": "ljust", "lstrip": "rstrip", "rstrip": "lstrip",
                 "islower": "isupper", "isupper": "islower", "find": "rfind", "rfind": "find",
                 "index": "rindex", "rindex": "index", "popleft": "pop"}


@dataclass(frozen=True)
class Mutant:
    kind: str
    code: str
    line: int  # 1-based line of the edit within the code


@dataclass
class Task:
    index: int
    row: dict[str, Any]
    content: str  # the reference assistant message
    span: tuple[int, int]  # where the code sits in `content`
    candidates: list[Mutant]
    tried: int = 0
    results: dict[str, list[bool]] = field(default_factory=dict)  # mutant code -> per-test pass
    rejected: set[str] = field(default_factory=set)  # unusable or unstable mutants
    chosen: list[Mutant] = field(default_factory=list)

    @property
    def code(self) -> str:
        return self.content[self.span[0]:self.span[1]]

    def answer(self, code: str) -> str:
        return self.content[: self.span[0]] + code + self.content[self.span[1]:]


# ------------------------------------------------------------------------------------------------
# Finding edits.
# ------------------------------------------------------------------------------------------------


class _Source:
    """Maps ast (line, utf-8 byte column) positions to offsets in the code string."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.lines = code.split("\n")
        self.starts = [0]
        for line in self.lines[:-1]:
            self.starts.append(self.starts[-1] + len(line) + 1)

    def offset(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col].decode("utf-8"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        return (self.offset(node.lineno, node.col_offset),  # type: ignore[attr-defined]
                self.offset(node.end_lineno, node.end_col_offset))  # type: ignore[attr-defined]

    def text(self, node: ast.AST) -> str:
        a, b = self.span(node)
        return self.code[a:b]


def _body_nodes(tree: ast.Module) -> list[tuple[ast.AST, ast.AST | None]]:
    """(node, parent) for every node inside function bodies, skipping annotations, signatures,
    decorators and f-strings (edits there are either no-ops or not about the logic)."""
    out: list[tuple[ast.AST, ast.AST | None]] = []

    def visit(node: ast.AST, parent: ast.AST | None) -> None:
        out.append((node, parent))
        if isinstance(node, ast.JoinedStr):
            return
        for name, value in ast.iter_fields(node):
            if name in ("annotation", "returns", "decorator_list", "type_comment"):
                continue
            if name == "args" and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    visit(child, node)

    for fn in tree.body:
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for stmt in fn.body:
                visit(stmt, fn)
    return out


def _between(src: _Source, left: ast.AST, right: ast.AST, pattern: str) -> tuple[int, int] | None:
    """Span of the operator `pattern` in the text between two operands."""
    a, b = src.span(left)[1], src.span(right)[0]
    m = re.search(pattern, src.code[a:b])
    return (a + m.start(), a + m.end()) if m else None


def _is_str(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _return_types(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Type names in the return annotation: `list[int]` -> [list], `Optional[int]` and `int | None` ->
    [int, None]; [] when there is none or it is something else."""
    ann = fn.returns
    if isinstance(ann, ast.BinOp) and isinstance(ann.op, ast.BitOr):
        parts = [ann.left, ann.right]
    elif isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "Optional":
        parts = [ann.slice, ast.Constant(None)]
    else:
        parts = [ann] if ann is not None else []
    out = []
    for part in parts:
        if isinstance(part, ast.Subscript):
            part = part.value
        if isinstance(part, ast.Name):
            out.append(part.id.lower() if part.id in ("List", "Dict", "Set", "Tuple") else part.id)
        elif isinstance(part, ast.Constant) and part.value is None:
            out.append("None")
    return out


def _edits(code: str, entry_point: str) -> list[tuple[str, int, int, str, int]]:
    """Every candidate edit as (kind, start, end, replacement, line)."""
    src = _Source(code)
    tree = ast.parse(code)
    edits: list[tuple[str, int, int, str, int]] = []

    def add(kind: str, span: tuple[int, int] | None, repl: str, node: ast.AST) -> None:
        if span is not None:
            edits.append((kind, span[0], span[1], repl, node.lineno))  # type: ignore[attr-defined]

    for node, parent in _body_nodes(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for i, op in enumerate(node.ops):
                pattern, repl = _CMP_SWAP[type(op)]
                add("flip_comparison", _between(src, operands[i], operands[i + 1], pattern), repl, node)
        elif isinstance(node, ast.BinOp) and type(node.op) in _ARITH_SWAP:
            if isinstance(node.op, (ast.Add, ast.Mod)) and (_is_str(node.left) or _is_str(node.right)):
                continue  # "a" - s or "%d" // n only raise TypeError
            pattern, repl = _ARITH_SWAP[type(node.op)]
            add("swap_arithmetic", _between(src, node.left, node.right, pattern), repl, node)
        elif isinstance(node, ast.AugAssign) and isinstance(node.op, (ast.Add, ast.Sub)):
            if _is_str(node.value):
                continue
            pattern, repl = (r"\+=", "-=") if isinstance(node.op, ast.Add) else (r"-=", "+=")
            add("swap_arithmetic", _between(src, node.target, node.value, pattern), repl, node)
        elif isinstance(node, ast.BoolOp):
            pattern, repl = (r"\band\b", "or") if isinstance(node.op, ast.And) else (r"\bor\b", "and")
            add("flip_boolean", _between(src, node.values[0], node.values[1], pattern), repl, node)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and not isinstance(
                node.operand, ast.Constant):
            add("swap_arithmetic", (src.span(node)[0], src.span(node.operand)[0]), "", node)  # `-x` -> `x`
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            add("flip_boolean", (src.span(node)[0], src.span(node.operand)[0]), "", node)  # `not x` -> `x`
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            span = src.span(node)
            for delta in (1, -1):
                value = node.value + delta
                if isinstance(parent, ast.UnaryOp) and value <= 0:
                    continue  # `--1` or `-0`
                tight = isinstance(parent, ast.Attribute) or (isinstance(parent, ast.BinOp)
                                                               and isinstance(parent.op, ast.Pow))
                add("off_by_one", span, f"({value})" if value < 0 and tight else str(value), node)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range"
              and node.args and not node.keywords):
            stop = node.args[0] if len(node.args) == 1 else node.args[1]
            if not isinstance(stop, ast.Constant):  # constants are covered above
                text = src.text(stop)
                text = text if isinstance(stop, _ATOMIC) else f"({text})"
                for delta in (" + 1", " - 1"):
                    add("off_by_one", src.span(stop), text + delta, stop)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "enumerate"
              and len(node.args) == 1 and not node.keywords):
            add("off_by_one", (src.span(node)[1] - 1,) * 2, ", 1", node)  # count from 1
        elif isinstance(node, ast.Slice):
            for bound in (node.lower, node.upper):
                if bound is not None and isinstance(bound, (ast.Name, ast.Call, ast.Attribute)):
                    for delta in (" + 1", " - 1"):
                        add("off_by_one", src.span(bound), src.text(bound) + delta, bound)
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in _SWAP_NAMES:
                add("swap_call", src.span(func), _SWAP_NAMES[func.id], node)
            elif isinstance(func, ast.Attribute) and func.attr in _SWAP_METHODS:
                end = src.span(func)[1]
                add("swap_call", (end - len(func.attr), end), _SWAP_METHODS[func.attr], node)
            if ((isinstance(func, ast.Name) and func.id == "sorted" and node.args)
                    or (isinstance(func, ast.Attribute) and func.attr == "sort" and not node.args)) and not any(
                    k.arg == "reverse" for k in node.keywords):
                text = src.text(node)[:-1].rstrip()
                sep = "" if text.endswith(("(", ",")) else ", "
                add("swap_call", src.span(node), f"{text}{sep}reverse=True)", node)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value:
            text = src.text(node)
            if text[:1] in "\"'" and text[-2:-1] not in "\"'" and text[-3:-2] != "\\":
                add("edit_string", src.span(node), text[:-2] + text[-1], node)  # drop the last character
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr)) and parent is not None:
            block = next((getattr(parent, f) for f in ("body", "orelse", "finalbody")
                          if isinstance(getattr(parent, f, None), list) and node in getattr(parent, f)), None)
            if block is None or len(block) < 2:
                continue  # dropping the only statement of a block is a syntax error
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # a docstring
            a, b = src.span(node)
            first, last = node.lineno, node.end_lineno  # type: ignore[attr-defined]
            line_start, line_end = src.starts[first - 1], src.starts[last - 1] + len(src.lines[last - 1])
            if code[line_start:a].strip() or code[b:line_end].strip():
                continue  # shares its line with something else
            if line_end < len(code):
                edits.append(("drop_line", line_start, line_end + 1, "", first))
            else:  # the code's last line: take the newline before it instead
                edits.append(("drop_line", line_start - 1, line_end, "", first))

    for fn in tree.body:
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name == entry_point:
            returns = [n for n in _own_nodes(fn) if isinstance(n, ast.Return) and n.value is not None]
            if returns:
                last = max(returns, key=lambda n: (n.lineno, n.col_offset))
                value = last.value
                assert value is not None
                types = _return_types(fn)
                if types == ["bool"]:
                    text = src.text(value)
                    add("replace_return", src.span(value),
                        f"not {text}" if isinstance(value, _ATOMIC) else f"not ({text})", last)
                for name in [*types, "None"]:
                    if name in _RETURN_DEFAULTS or name == "None":
                        add("replace_return", src.span(value), _RETURN_DEFAULTS.get(name, "None"), last)
    return edits


def _own_nodes(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.AST]:
    """Nodes of `fn`'s body, not descending into nested functions, classes or lambdas."""
    out: list[ast.AST] = []
    stack: list[ast.AST] = list(fn.body)
    while stack:
        node = stack.pop()
        out.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))
    return out


def mutants(code: str, entry_point: str) -> list[Mutant]:
    """All distinct edits of `code` that still parse, still define `entry_point` and change its AST."""
    original = ast.dump(ast.parse(code))
    seen: set[str] = set()
    out: list[Mutant] = []
    for kind, start, end, repl, line in _edits(code, entry_point):
        new = code[:start] + repl + code[end:]
        if new in seen:
            continue
        seen.add(new)
        try:
            tree = ast.parse(new)
        except SyntaxError:
            continue
        if ast.dump(tree) == original:
            continue
        if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == entry_point
                   for n in tree.body):
            continue
        out.append(Mutant(kind, new, line))
    return out


def order(candidates: list[Mutant], task_id: str, index: int) -> list[Mutant]:
    """Deterministic try order: each kind's edits shuffled (seeded by task id and kind), kinds rotated by
    the task index and interleaved, so the variants spread over kinds and over the code. `replace_return`
    goes last in each pass: it nearly always applies and fails, so it would otherwise crowd out the
    subtler edits."""
    subtle = [k for k in KINDS if k != "replace_return"]
    rot = index % len(subtle)
    kinds = [*subtle[rot:], *subtle[:rot], "replace_return"]
    groups = []
    for kind in kinds:
        group = [m for m in candidates if m.kind == kind]
        random.Random(f"{task_id}:{kind}").shuffle(group)
        groups.append(group)
    out: list[Mutant] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


# ------------------------------------------------------------------------------------------------
# Running.
# ------------------------------------------------------------------------------------------------


def program(code: str, test: str) -> str:
    return f"{code}\n\n{test}\n"


def run_tests(jobs: list[tuple[str, list[str]]], workers: int | None) -> list[list[ExecutionResult]]:
    """For each (code, tests): one sandboxed program per test."""
    flat = [program(code, t) for code, tests in jobs for t in tests]
    results = execute_many(flat, workers=workers, timeout=TIMEOUT_S) if flat else []
    out, i = [], 0
    for _, tests in jobs:
        out.append(results[i:i + len(tests)])
        i += len(tests)
    return out


def _verdicts(results: list[ExecutionResult]) -> list[bool] | None:
    """Per-test pass/fail, or None where any run ended in a speed- or host-dependent way."""
    if any(r.status not in USABLE for r in results):
        return None
    return [r.passed for r in results]


def score(passes: list[bool]) -> float:
    return round(sum(passes) / len(passes), 4)


def load(path: Path = SOURCE) -> list[Task]:
    tasks = []
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for i, row in enumerate(rows):
        content = row["messages"][1]["content"]
        m = FENCE.search(content)
        if m is None:
            raise SystemExit(f"{row['id']}: no ```python block in the reference answer")
        tasks.append(Task(i, row, content, m.span(1), []))
        tasks[-1].candidates = order(mutants(m.group(1), row["entry_point"]), row["id"], i)
    return tasks


def _pick(task: Task) -> list[Mutant]:
    """Variants A and B from what has been run so far (in try order); fewer if not found yet."""
    failing = [m for m in task.candidates[: task.tried]
               if m.code not in task.rejected and m.code in task.results and not all(task.results[m.code])]
    if not failing:
        return []
    a = failing[0]
    b = next((m for m in failing[1:] if m.kind != a.kind), None)
    if b is None and task.tried >= len(task.candidates):  # exhausted: accept a second edit of the same kind
        b = next(iter(failing[1:]), None)
    return [a] if b is None else [a, b]


def search(tasks: list[Task], workers: int | None, log: Any) -> None:
    """Run candidates in rounds of `WAVE` per task until each task has A and B or runs out."""
    rnd = 0
    while True:
        pending = [t for t in tasks if len(_pick(t)) < 2 and t.tried < len(t.candidates)]
        if not pending:
            return
        rnd += 1
        batch: list[tuple[Task, Mutant]] = []
        for t in pending:
            batch.extend((t, m) for m in t.candidates[t.tried:t.tried + WAVE])
            t.tried = min(t.tried + WAVE, len(t.candidates))
        t0 = time.monotonic()
        results = run_tests([(m.code, t.row["tests"]) for t, m in batch], workers)
        for (t, m), res in zip(batch, results, strict=True):
            passes = _verdicts(res)
            if passes is None:
                t.rejected.add(m.code)
            else:
                t.results[m.code] = passes
        log(f"round {rnd}: {len(pending)} tasks, {len(batch)} candidates, "
            f"{sum(len(t.row['tests']) for t, _ in batch)} programs, {time.monotonic() - t0:.1f} s")


def derive(workers: int | None = None, log: Any = print) -> dict[str, Any]:
    t_start = time.monotonic()
    tasks = load()
    log(f"{len(tasks)} tasks, {sum(len(t.candidates) for t in tasks)} candidate edits")
    # The references: every test must pass (twice, with the verification below).
    ref = run_tests([(t.code, t.row["tests"]) for t in tasks], workers)
    bad = [(t.row["id"], r.reason) for t, res in zip(tasks, ref, strict=True) for r in res if not r.passed]
    if bad:
        raise SystemExit(f"reference solutions fail their tests: {bad[:5]}")
    while True:
        search(tasks, workers, log)
        picks = {t.index: _pick(t) for t in tasks}
        todo = [(t, m) for t in tasks for m in picks[t.index] if len(picks[t.index]) == 2]
        # Second run of the references and the chosen variants: the verdicts must repeat.
        jobs = [(t.code, t.row["tests"]) for t in tasks] + [(m.code, t.row["tests"]) for t, m in todo]
        again = run_tests(jobs, workers)
        bad = [(t.row["id"], r.reason) for t, res in zip(tasks, again[: len(tasks)], strict=True)
               for r in res if not r.passed]
        if bad:
            raise SystemExit(f"reference solutions fail their tests on the second run: {bad[:5]}")
        unstable = 0
        for (t, m), res in zip(todo, again[len(tasks):], strict=True):
            if _verdicts(res) != t.results[m.code]:
                t.rejected.add(m.code)
                unstable += 1
        log(f"verification: {len(tasks)} references and {len(todo)} variants re-run, {unstable} unstable")
        if not unstable:
            break
    for t in tasks:
        t.chosen = picks[t.index] if len(picks[t.index]) == 2 else []
    stats = write(tasks)
    stats["seconds"] = round(time.monotonic() - t_start, 1)
    return stats


# ------------------------------------------------------------------------------------------------
# Writing.
# ------------------------------------------------------------------------------------------------


def rows(tasks: list[Task]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in OUTPUTS}
    for t in tasks:
        if not t.chosen:
            continue
        i = len(out["pairs"])
        row = t.row
        prompt = row["messages"][0]["content"]
        a, b = t.chosen
        common = {"entry_point": row["entry_point"], "tests": row["tests"]}
        out["pairs"].append({"id": row["id"], "prompt": prompt, "chosen": t.content, "rejected": t.answer(a.code),
                             "mutation": a.kind, **common})
        responses = [(t.content, 1.0, None), (t.answer(a.code), score(t.results[a.code]), a.kind),
                     (t.answer(b.code), score(t.results[b.code]), b.kind)]
        r = i % len(responses)
        responses = responses[r:] + responses[:r]
        out["ranked"].append({"id": row["id"], "prompt": prompt, "responses": [x[0] for x in responses],
                              "scores": [x[1] for x in responses], "mutations": [x[2] for x in responses],
                              **common})
        good = i % 2 == 0
        out["unpaired"].append({"id": row["id"], "prompt": prompt,
                                "completion": t.content if good else t.answer(a.code), "label": good,
                                "mutation": None if good else a.kind, **common})
        # multi-target SFT: the solution and the task's unit tests as a second target (code + its tests)
        tests = "```python\n" + "\n".join(row["tests"]) + "\n```"
        out["multi_target"].append({"id": row["id"], "prompt": prompt, "targets": [t.content, tests], **common})
    out["feedback"] = feedback_rows(out["pairs"])
    return out


def feedback_rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LeTI rows from the pairs: chosen -> reward true (no feedback), rejected -> reward false with `FEEDBACK`.

    The feedback is a fixed generic line, not the variant's own execution output (the search above keeps
    per-test verdicts only; a variant may also fail with another exception than an assert).
    """
    out = []
    for p in pairs:
        common = {"id": p["id"], "prompt": p["prompt"]}
        out.append({**common, "attempt": p["chosen"], "reward": True, "feedback": "", "mutation": None,
                    "entry_point": p["entry_point"], "tests": p["tests"]})
        out.append({**common, "attempt": p["rejected"], "reward": False, "feedback": FEEDBACK,
                    "mutation": p["mutation"], "entry_point": p["entry_point"], "tests": p["tests"]})
    return out


def write(tasks: list[Task], folder: Path = HERE) -> dict[str, Any]:
    data = rows(tasks)
    for key, name in OUTPUTS.items():
        with (folder / name).open("w", encoding="utf-8", newline="\n") as f:
            for row in data[key]:
                f.write(json.dumps(row) + "\n")
    kinds_a = Counter(r["mutation"] for r in data["pairs"])
    kinds_all = Counter(k for r in data["ranked"] for k in r["mutations"] if k)
    variant_scores = Counter(s for r in data["ranked"] for s, k in zip(r["scores"], r["mutations"], strict=True) if k)
    return {
        "tasks": len(tasks),
        "rows": {k: len(v) for k, v in data.items()},
        "skipped": [t.row["id"] for t in tasks if not t.chosen],
        "candidates": sum(len(t.candidates) for t in tasks),
        "candidates_run": sum(t.tried for t in tasks),
        "unusable": sum(len(t.rejected) for t in tasks),
        "pair_kinds": dict(sorted(kinds_a.items())),
        "variant_kinds": dict(sorted(kinds_all.items())),
        "variant_scores": {str(k): v for k, v in sorted(variant_scores.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=None, help="sandbox programs at a time (default: cores)")
    args = parser.parse_args(argv)
    stats = derive(args.workers, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
