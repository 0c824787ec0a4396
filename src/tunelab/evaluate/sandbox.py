"""Run untrusted, model-generated Python programs and decide pass/fail in a way the program cannot fake.

`execute(program)` runs one program (candidate code followed by its tests, e.g. MBPP asserts or a
HumanEval ``check(entry_point)``) and returns an `ExecutionResult`; `execute_many` runs a batch with
bounded concurrency. ``passed`` means every top-level statement ran to the end without an exception and
every assert held.

What is isolated (on a host where bubblewrap works; `ExecutionResult.isolation` says what was in force
for each run and never claims more):

* a fresh interpreter per program: the system's ``/usr/bin/python3 -I -S -B`` (stdlib only: no
  site-packages, no PYTHON* variables, no user site; ``exit``/``quit`` are still provided), started with
  an empty environment (only PATH, HOME, TMPDIR, LANG), stdin ``/dev/null``;
* bubblewrap ``--unshare-all``: new user, pid, network, ipc, uts, cgroup and mount namespaces, so no
  network at all (only a private loopback), no view of host processes, uid 65534 with no capabilities,
  ``--die-with-parent``, ``--new-session``;
* file system: read-only ``/usr`` (+ the ``/bin``, ``/lib*`` symlinks), private ``/proc`` and ``/dev``,
  a size-capped tmpfs ``/tmp`` (the program's empty working dir, gone when it ends) and ``/dev/shm``;
  the rest of the root is read-only and empty, so ``/root``, ``/home``, ``/work``, the repository and
  the evaluator's files do not exist inside;
* when the evaluator runs as root, each run gets a fresh random host uid, so ``RLIMIT_NPROC`` counts
  only that run's processes (a fork bomb stops at the limit) and every leftover process can be found and
  SIGKILLed by uid after the run;
* rlimits set by the trusted runner before any untrusted code: CPU seconds, address space
  (``memory_mb``), file size, open files, processes, no core dumps;
* a seccomp filter (installed by the runner, irrevocable, inherited): no execve/execveat (so no
  subprocesses, ``os.system`` or re-exec under ``-O``), no AF_INET/AF_INET6/netlink/packet sockets
  (only AF_UNIX), no new namespaces, mount, ptrace, process_vm_*, setsid/setpgid, io_uring, bpf,
  perf_event_open, userfaultfd or keyrings; other ABIs (``int 0x80``, x32) are refused;
* a wall clock kept by the parent: at the deadline the whole tree is SIGKILLed (namespace teardown,
  plus the per-run uid sweep), whatever signals the program ignores or blocks;
* stdout and stderr are read by the parent with a cap (`OUTPUT_LIMIT` each); going over it stops the
  run with status ``output_limit``.

How the verdict is made: the parent parses the program with `ast` and *lifts* test asserts (top-level
asserts and asserts in top-level test functions that are called at top level, like HumanEval's
``check``) out of the program. Each lifted ``assert EXPR`` is rewritten so that the sandbox only
evaluates the sub-expressions that need the program (calls, names...), serialises their values with a
strict type-tagged encoder (None, bool, int, float, complex, str, bytes, bytearray, list, tuple, dict,
set, frozenset; subclasses reduced to their builtin value by the base type's own C methods) and sends
them over a private pipe. Literals, comparisons, arithmetic, ``and``/``or``/``not`` and a few pure
builtins (``abs``, ``len``, ``sorted``, ``set``, ``list``, ``sum``, ``min``, ``round``, ``math.isclose``...)
are evaluated in the trusted parent on the decoded values, with Python's own semantics (``4 == 4.0``,
``[1] != (1,)``); ``is``/``is not`` stay in the sandbox, where no object can fake identity. The expected
values therefore never enter the sandbox, and an
object whose ``__eq__`` always returns True, patched builtins (``builtins.abs``, ``AssertionError``),
a patched ``print`` or ctypes writes to the interpreter cannot make a wrong value compare equal. A
lifted assert that fails stops the run (status ``failed``) even if the program would have caught the
AssertionError. Straight-line test asserts are *mandatory*: the run only passes if each of them
actually reported a matching value, so skipping them (replacing the hook, rebinding ``check``) fails.

``exit(0)``, ``sys.exit(0)``, ``raise SystemExit``, ``os._exit(0)``, ``atexit`` handlers, exit codes and
anything printed never count: only the runner's ``end`` record does, sent after the last statement, on
a channel carrying a per-run nonce, from the original process (forked copies are silenced).

What is NOT isolated or detected (read before trusting a number):

* hard-coding: a program that returns the visible tests' expected values (MBPP shows its asserts in
  the prompt) passes. Only hidden tests (MBPP+/HumanEval+) address that;
* checks run inside the sandbox: asserts in helper functions, comprehension/lambda bodies
  (``all(f(x) == y for ...)`` compares in the sandbox), expected values computed at run time from
  variables the program can reach, and non-assert test logic. A program that deliberately tampers with
  the in-process runner (frames, gc, ctypes) can skip non-mandatory checks or forge records for them,
  but it cannot learn the expected literals of lifted asserts;
* guessable expected values: an assert whose expected value is True/False/None can be forged by a
  program that tampers with the runner, since the value is easy to guess;
* values that are not builtin data (numpy scalars, custom classes, iterators outside iterating
  builtins) cannot be compared safely, so a lifted assert on them fails even where plain Python would
  pass. ``list(gen)``, ``sorted(x)``, ``set(x)``, ``len(x)``... accept any iterable/sized object;
* asserts are evaluated eagerly: every sub-expression of a lifted assert runs, so ``a or b`` also
  evaluates ``b`` (an exception there turns a pass into an error);
* timing and side channels, CPU cache attacks, kernel exploits (namespaces and seccomp reduce the
  attack surface; they are not a VM); system-wide facts in ``/proc`` (CPU, memory, kernel version) stay
  readable;
* tmpfs sizes bound disk use inside bubblewrap; without bubblewrap (fallback modes) the program writes
  to a host temp dir (and any world-writable host dir), can read world-readable host files, only
  ``RLIMIT_FSIZE`` caps each file, and in rlimits-only mode AF_UNIX sockets (abstract ones included)
  of the host are reachable;
* without bubblewrap and without root, the program runs as the evaluator's own uid: it could then
  signal or read the evaluator's processes (seccomp only blocks ``kill`` of other pids). The
  ``isolation`` field says so.

Fallbacks, chosen once per process by a probe and cached: bubblewrap → ``unshare`` (util-linux; net,
pid, ipc, uts and mount namespaces, host file system visible) → rlimits + seccomp only.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import dataclasses
import json
import logging
import marshal
import math
import operator
import os
import re
import reprlib
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "error", "timeout", "memory_limit", "output_limit", "killed", "sandbox_error")
OUTPUT_LIMIT = 64 * 1024
MAX_PROGRAM_BYTES = 8 * 1024 * 1024
TMPFS_BYTES = 64 * 1024 * 1024
SHM_BYTES = 16 * 1024 * 1024
FILE_SIZE_LIMIT = 16 * 1024 * 1024
NPROC_LIMIT = 32
NOFILE_LIMIT = 256
STARTUP_LIMIT = 20.0
SANDBOX_UID = 65534
_CHANNEL_LIMIT = 64 * 1024 * 1024
_RECORD_LIMIT = 16 * 1024 * 1024
_MEMORY_POLL = 0.1  # seconds between checks of the whole tree's memory
_UID_RANGE = (2_000_000_000, 2_140_000_000)  # bwrap parses uids as signed ints
# Reads the job memfd: 8-byte length, the runner's marshalled code (or nothing: then the source comes in
# argv[1]), then the marshalled job, which the runner finds in its `_JOB` global.
_BOOTSTRAP = (
    "import marshal,os,sys\n"
    "f=int(sys.argv[-3]);b=[]\n"
    "while 1:\n"
    " c=os.read(f,1<<20)\n"
    " if not c:break\n"
    " b.append(c)\n"
    "os.close(f);d=b''.join(b);n=int.from_bytes(d[:8],'little')\n"
    "k=marshal.loads(d[8:8+n]) if n else compile(sys.argv[1],'<tunelab-runner>','exec')\n"
    "exec(k,{'__name__':'__main__','__builtins__':__builtins__,'_JOB':d[8+n:]})\n"
)
_HOOK = "__tunelab_check__"


@dataclass
class ExecutionResult:
    """Outcome of one program. `status` is one of `STATUSES`; `passed` is True only for "passed"."""

    passed: bool
    status: str
    reason: str
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    isolation: str = ""
    checks: int = 0  # asserts whose values were compared by the trusted parent
    returncode: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class _ProgramError(Exception):
    """The program cannot be run at all (syntax error, too large); the message is the reason."""


# --------------------------------------------------------------------------------------------------
# Static analysis: find test asserts, split them into a trusted skeleton and sandboxed leaves.
# --------------------------------------------------------------------------------------------------

_MATH_FUNCS = {"isclose", "fabs"}
_BINOPS: dict[type, str] = {
    ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "truediv", ast.FloorDiv: "floordiv",
    ast.Mod: "mod", ast.Pow: "pow", ast.LShift: "lshift", ast.RShift: "rshift", ast.BitOr: "or_",
    ast.BitAnd: "and_", ast.BitXor: "xor",
}
_UNARY: dict[type, str] = {ast.Not: "not", ast.USub: "neg", ast.UAdd: "pos", ast.Invert: "invert"}
_CMPOPS: dict[type, str] = {
    ast.Eq: "eq", ast.NotEq: "ne", ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge",
    ast.In: "in", ast.NotIn: "not in",
}


@dataclass
class _Check:
    cid: int
    lineno: int
    source: str
    skeleton: Any
    leaves: list[str]
    modes: list[str]
    mandatory: bool


@dataclass
class _Plan:
    program: str  # the rewritten program sent to the sandbox
    setup: str | None
    lines: list[str]  # original program lines, for reasons
    setup_lines: list[str]
    stmt_lines: list[int]
    checks: list[_Check] = field(default_factory=list)


def _normalise(source: str) -> str:
    # compile() already treats \r\n and \r as newlines; normalising keeps byte offsets line-exact.
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    return source[1:] if source.startswith("\ufeff") else source


def _parse(source: str, filename: str, what: str) -> ast.Module:
    try:
        return ast.parse(source, filename)
    except SyntaxError as exc:
        where = f" (line {exc.lineno})" if exc.lineno else ""
        text = f": {exc.text.strip()}" if exc.text and exc.text.strip() else ""
        raise _ProgramError(f"{what}{type(exc).__name__}: {exc.msg}{where}{text}") from None
    except (ValueError, RecursionError, MemoryError, OverflowError) as exc:
        raise _ProgramError(f"{what}cannot be parsed: {type(exc).__name__}: {exc}") from None


def _bound_names(trees: Sequence[ast.AST]) -> set[str]:
    """Every name the program or setup binds anywhere, so shadowed builtins are not treated as builtins."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
                names.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                names.add(node.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if not (alias.name == "math" and alias.asname is None):
                        names.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    names.add(alias.asname or alias.name)
            elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
                names.add(node.name)
            elif isinstance(node, ast.MatchMapping) and node.rest:
                names.add(node.rest)
    return names


def _is_main_guard(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    a, b = test.left, test.comparators[0]
    pair = {type(a), type(b)}
    if pair != {ast.Name, ast.Constant}:
        return False
    name, const = (a, b) if isinstance(a, ast.Name) else (b, a)
    return name.id == "__name__" and const.value == "__main__"  # type: ignore[attr-defined]


def _walk_scope(node: ast.AST) -> list[ast.AST]:
    """Nodes under `node` without descending into nested functions, classes or lambdas."""
    out: list[ast.AST] = []
    stack = list(ast.iter_child_nodes(node))
    while stack:
        cur = stack.pop()
        out.append(cur)
        if not isinstance(cur, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(cur))
    return out


def _contains(node: ast.AST, kinds: tuple[type, ...]) -> bool:
    return isinstance(node, kinds) or any(isinstance(n, kinds) for n in _walk_scope(node))


def _collect_asserts(stmts: list[ast.stmt], straight: bool, in_function: bool,
                     out: list[tuple[ast.Assert, bool]]) -> None:
    for stmt in stmts:
        if isinstance(stmt, ast.Assert):
            out.append((stmt, straight))
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            pass
        elif isinstance(stmt, ast.If) and _is_main_guard(stmt.test):
            # The runner executes the program as __main__, so this branch always runs.
            _collect_asserts(stmt.body, straight, in_function, out)
            _collect_asserts(stmt.orelse, False, in_function, out)
        else:
            for attr in ("body", "orelse", "finalbody"):
                block = getattr(stmt, attr, None)
                if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                    _collect_asserts(block, False, in_function, out)
            for handler in getattr(stmt, "handlers", None) or []:
                _collect_asserts(handler.body, False, in_function, out)
            for case in getattr(stmt, "cases", None) or []:
                _collect_asserts(case.body, False, in_function, out)
        if in_function and straight and _contains(stmt, (ast.Return,)):
            straight = False  # an earlier return may skip what follows


def _binds(stmt: ast.stmt, name: str) -> bool:
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, (ast.Store, ast.Del)):
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (a.asname or a.name.split(".")[0]) == name for a in node.names):
            return True
    return False


def _top_level_calls(body: list[ast.stmt]) -> list[tuple[int, str, bool]]:
    """(statement index, function name, straight) of `name(...)` expression statements at top level."""
    calls: list[tuple[int, str, bool]] = []

    def visit(stmts: list[ast.stmt], index: int | None, straight: bool) -> None:
        for i, stmt in enumerate(stmts):
            pos = i if index is None else index
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and isinstance(
                    stmt.value.func, ast.Name):
                calls.append((pos, stmt.value.func.id, straight))
            elif isinstance(stmt, ast.If):
                visit(stmt.body, pos, straight and _is_main_guard(stmt.test))
                visit(stmt.orelse, pos, False)
            elif isinstance(stmt, (ast.For, ast.While, ast.With, ast.Try)):
                for attr in ("body", "orelse", "finalbody"):
                    visit(getattr(stmt, attr, []) or [], pos, False)

    visit(body, None, True)
    return calls


class _Lifter:
    """Builds the trusted skeleton of each test assert and the rewritten program text."""

    def __init__(self, source: str, shadowed: set[str]) -> None:
        self.data = source.encode("utf-8")
        self.starts = [0] + [m.end() for m in re.finditer(b"\n", self.data)]
        self.shadowed = shadowed
        self.checks: list[_Check] = []
        self.edits: list[tuple[int, int, str]] = []
        self._leaves: list[ast.expr] = []
        self._modes: list[str] = []

    def offset(self, lineno: int, col: int) -> int:
        return self.starts[lineno - 1] + col

    def text(self, node: ast.AST) -> str:
        a = self.offset(node.lineno, node.col_offset)  # type: ignore[attr-defined]
        b = self.offset(node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]
        return self.data[a:b].decode("utf-8")

    def lift(self, node: ast.Assert, mandatory: bool) -> None:
        self._leaves, self._modes = [], []
        skeleton = self.build(node.test, "v")
        cid = len(self.checks)
        source = " ".join(self.text(node).split())
        self.checks.append(_Check(cid, node.lineno, source[:300], skeleton,
                                  [" ".join(self.text(n).split())[:120] for n in self._leaves],
                                  list(self._modes), mandatory))
        parts = [f"{_HOOK}({cid}"]
        line = node.lineno
        for leaf in self._leaves:
            parts.append(", ")
            if leaf.lineno > line:
                parts.append("\n" * (leaf.lineno - line))
            parts.append("(" + self.text(leaf) + ")")
            line = leaf.end_lineno or leaf.lineno
        if (node.end_lineno or line) > line:
            parts.append("\n" * ((node.end_lineno or line) - line))
        parts.append(")")
        start = self.offset(node.lineno, node.col_offset)
        end = self.offset(node.end_lineno or node.lineno, node.end_col_offset or 0)
        self.edits.append((start, end, "".join(parts)))

    def leaf(self, node: ast.expr, mode: str) -> tuple[str, int]:
        self._leaves.append(node)
        self._modes.append(mode)
        return ("leaf", len(self._leaves) - 1)

    def build(self, node: ast.expr, mode: str) -> Any:
        if isinstance(node, ast.Constant):
            return ("const", node.value)
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)) and not any(
                isinstance(e, ast.Starred) for e in node.elts):
            kind = {ast.List: "list", ast.Tuple: "tuple", ast.Set: "set"}[type(node)]
            return (kind, [self.build(e, "v") for e in node.elts])
        if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
            pairs = []
            for k, v in zip(node.keys, node.values, strict=True):
                pairs.append((self.build(k, "v"), self.build(v, "v")))  # type: ignore[arg-type]
            return ("dict", pairs)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return ("unary", _UNARY[type(node.op)], self.build(node.operand, "v"))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            if isinstance(node.op, ast.Mod) and isinstance(node.left, (ast.Constant, ast.JoinedStr)):
                return self.leaf(node, mode)  # string formatting stays in the sandbox
            return ("bin", _BINOPS[type(node.op)], self.build(node.left, "v"), self.build(node.right, "v"))
        if isinstance(node, ast.BoolOp):
            return ("bool", "and" if isinstance(node.op, ast.And) else "or",
                    [self.build(v, "v") for v in node.values])
        if isinstance(node, ast.Compare) and self._compare_ok(node):
            left = self.build(node.left, "v")
            # `x in container` only needs the container's items, so any iterable the program returns
            # (a Mapping, os.environ, a generator) is iterated in the sandbox instead of being refused.
            single_in = len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn))
            rest = [(_CMPOPS[type(op)], self.build(c, "it" if single_in else "v"))
                    for op, c in zip(node.ops, node.comparators, strict=True)]
            return ("cmp", left, rest)
        if isinstance(node, ast.Call):
            spec = self._call_spec(node)
            if spec is not None:
                name, arg_mode = spec
                args = [self.build(a, arg_mode) for a in node.args]
                kwargs = {kw.arg: self.build(kw.value, "v") for kw in node.keywords}
                return ("call", name, args, kwargs)
        return self.leaf(node, mode)

    @staticmethod
    def _compare_ok(node: ast.Compare) -> bool:
        # `is` / `is not` stay in the sandbox: identity means nothing across processes, and unlike `==`
        # no object can make `x is None` lie, so the sandbox's bool is as good as the parent's.
        return all(type(op) in _CMPOPS for op in node.ops)

    def _call_spec(self, node: ast.Call) -> tuple[str, str] | None:
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return None
        if any(isinstance(a, ast.GeneratorExp) for a in node.args) and len(node.args) > 1:
            return None
        func = node.func
        kw = {k.arg for k in node.keywords}
        nargs = len(node.args)
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if func.value.id != "math" or "math" in self.shadowed or func.attr not in _MATH_FUNCS:
                return None
            if func.attr == "isclose" and nargs == 2 and kw <= {"rel_tol", "abs_tol"}:
                return ("isclose", "v")
            if func.attr == "fabs" and nargs == 1 and not kw:
                return ("fabs", "v")
            return None
        if not isinstance(func, ast.Name) or func.id in self.shadowed:
            return None
        name = func.id
        if name in ("list", "tuple", "set", "frozenset") and nargs <= 1 and not kw:
            return (name, "it")
        if name == "sorted" and nargs == 1 and kw <= {"reverse"}:
            return (name, "it")
        if name in ("any", "all") and nargs == 1 and not kw:
            return (name, "it")
        if name == "sum" and nargs in (1, 2) and not kw:
            return (name, "it") if nargs == 1 else None
        if name in ("min", "max") and not kw:
            return (name, "it") if nargs == 1 else ((name, "v") if nargs >= 2 else None)
        if name == "len" and nargs == 1 and not kw:
            return (name, "len")
        # str()/repr() stay in the sandbox: their text for sets and custom objects is only defined there.
        if name in ("abs", "bool", "float") and nargs <= 1 and not kw and (nargs or name != "abs"):
            return (name, "v")
        if name in ("round", "int") and 1 <= nargs <= 2 and not kw:
            return (name, "v")
        return None

    def rewritten(self) -> str:
        pieces: list[bytes] = []
        pos = 0
        for start, end, text in sorted(self.edits):
            pieces += [self.data[pos:start], text.encode("utf-8")]
            pos = end
        pieces.append(self.data[pos:])
        return b"".join(pieces).decode("utf-8")


def _analyse(program: str, setup: str | None) -> _Plan:
    if not isinstance(program, str):
        raise TypeError("program must be a str")
    if setup is not None and not isinstance(setup, str):
        raise TypeError("setup must be a str or None")
    if len(program.encode("utf-8", "surrogatepass")) + len((setup or "").encode("utf-8", "surrogatepass")) \
            > MAX_PROGRAM_BYTES:
        raise _ProgramError(f"program too large (over {MAX_PROGRAM_BYTES} bytes)")
    source = _normalise(program)
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:
        raise _ProgramError("program contains unencodable characters (lone surrogates)") from None
    tree = _parse(source, "<program>", "")
    setup_src = _normalise(setup) if setup else None
    trees: list[ast.AST] = [tree]
    if setup_src:
        trees.append(_parse(setup_src, "<setup>", "setup code: "))

    lifter = _Lifter(source, _bound_names(trees))
    found: list[tuple[ast.Assert, bool]] = []
    try:
        _collect_asserts(tree.body, True, False, found)
        calls = _top_level_calls(tree.body)
        for index, stmt in enumerate(tree.body):
            if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            later = [(pos, straight) for pos, name, straight in calls if name == stmt.name and pos > index]
            if not later:
                continue
            # Mandatory only when the call certainly runs this very function body to its asserts.
            sure = (isinstance(stmt, ast.FunctionDef) and not stmt.decorator_list
                    and not _contains(stmt, (ast.Yield, ast.YieldFrom, ast.Await))
                    and any(straight and not any(_binds(s, stmt.name) for s in tree.body[index + 1:pos])
                            for pos, straight in later))
            _collect_asserts(stmt.body, sure, True, found)
        for node, mandatory in sorted(found, key=lambda item: (item[0].lineno, item[0].col_offset)):
            lifter.lift(node, mandatory)
    except RecursionError:
        raise _ProgramError("program too deeply nested to analyse") from None
    return _Plan(
        program=lifter.rewritten(),
        setup=setup_src,
        lines=source.split("\n"),
        setup_lines=setup_src.split("\n") if setup_src else [],
        stmt_lines=[s.lineno for s in tree.body],
        checks=lifter.checks,
    )


# --------------------------------------------------------------------------------------------------
# Trusted side of a check: decode the sandbox's values, evaluate the skeleton.
# --------------------------------------------------------------------------------------------------


class _Protocol(Exception):
    """The sandbox sent something the runner never sends: tampering or a broken runner."""


class _Unusable(Exception):
    """A leaf value that cannot be compared safely (not builtin data)."""


class _Refused(Exception):
    """An operation the parent will not perform on untrusted sizes (e.g. 10**10**9)."""


@dataclass(frozen=True)
class _Length:
    n: int


_BAD = object()


def _decode(obj: Any, depth: int = 0) -> Any:
    if depth > 120 or not isinstance(obj, list) or not obj or not isinstance(obj[0], str):
        raise _Protocol("malformed value")
    tag, rest = obj[0], obj[1:]
    try:
        if tag == "n" and not rest:
            return None
        if tag == "e" and not rest:
            return Ellipsis
        if tag == "b" and rest in ([0], [1]):
            return rest[0] == 1
        if tag == "i" and len(rest) == 1 and isinstance(rest[0], str) and len(rest[0]) < 20_000_000:
            return int(rest[0], 16)
        if tag == "f" and len(rest) == 1 and isinstance(rest[0], str):
            return float.fromhex(rest[0])
        if tag == "c" and len(rest) == 2 and all(isinstance(x, str) for x in rest):
            return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
        if tag == "s" and len(rest) == 1 and isinstance(rest[0], str):
            return rest[0]
        if tag in ("y", "Y") and len(rest) == 1 and isinstance(rest[0], str):
            raw = bytes.fromhex(rest[0])
            return raw if tag == "y" else bytearray(raw)
        if tag in ("l", "t", "S", "F") and len(rest) == 1 and isinstance(rest[0], list):
            items = [_decode(x, depth + 1) for x in rest[0]]
            return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
        if tag == "d" and len(rest) == 1 and isinstance(rest[0], list):
            out = {}
            for pair in rest[0]:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise _Protocol("malformed dict")
                out[_decode(pair[0], depth + 1)] = _decode(pair[1], depth + 1)
            return out
    except (ValueError, TypeError, OverflowError) as exc:
        raise _Protocol(f"malformed value ({exc})") from None
    raise _Protocol(f"unknown value tag {tag!r}")


def _decode_leaf(obj: Any, mode: str) -> Any:
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str)):
        raise _Protocol("malformed leaf")
    tag, payload = obj
    if tag == "ok":
        return _decode(payload)
    if tag == "x" and isinstance(payload, str):
        return (_BAD, payload[:300])
    if tag == "it" and mode == "it" and isinstance(payload, list):
        return [_decode(x, 1) for x in payload]
    if tag == "ln" and mode == "len" and isinstance(payload, str):
        try:
            return _Length(int(payload, 16))
        except ValueError:
            raise _Protocol("malformed length") from None
    raise _Protocol("malformed leaf")


_SEQ = (str, bytes, bytearray, list, tuple)
_SIZE_CAP = 10_000_000
_BITS_CAP = 4_000_000


def _size(x: Any) -> int:
    return len(x) if isinstance(x, _SEQ) else 0


def _binop(op: str, a: Any, b: Any) -> Any:
    if op == "pow" and type(a) is int and type(b) is int and b > 0 and abs(a) > 1 and (
            b > _BITS_CAP or a.bit_length() * b > _BITS_CAP):
        raise _Refused("integer power too large to evaluate")
    if op == "mul":
        for seq, n in ((a, b), (b, a)):
            if isinstance(seq, _SEQ) and isinstance(n, int) and len(seq) * max(n, 0) > _SIZE_CAP:
                raise _Refused("sequence repetition too large to evaluate")
        if type(a) is int and type(b) is int and a.bit_length() + b.bit_length() > _BITS_CAP:
            raise _Refused("integer product too large to evaluate")
    if op == "lshift" and isinstance(b, int) and b > _BITS_CAP:
        raise _Refused("shift too large to evaluate")
    if op == "mod" and isinstance(a, (str, bytes, bytearray)):
        raise _Refused("string formatting is not evaluated outside the sandbox")
    if op == "add" and _size(a) + _size(b) > _SIZE_CAP:
        raise _Refused("concatenation too large to evaluate")
    return getattr(operator, op)(a, b)


def _compare(op: str, a: Any, b: Any) -> bool:
    if op == "eq":
        return a == b
    if op == "ne":
        return a != b
    if op == "lt":
        return a < b
    if op == "le":
        return a <= b
    if op == "gt":
        return a > b
    if op == "ge":
        return a >= b
    if op == "in":
        return a in b
    if op == "not in":
        return a not in b
    raise _Protocol(f"unknown comparison {op}")


def _number(x: Any) -> bool:
    return type(x) in (int, float, complex, bool)


def _call(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    if name == "len":
        return args[0].n if isinstance(args[0], _Length) else len(args[0])
    if any(isinstance(a, _Length) for a in args):
        raise _Protocol("length value used outside len()")
    if name == "isclose":
        return math.isclose(*args, **kwargs)
    if name == "fabs":
        return math.fabs(*args)
    if name == "round" and len(args) == 2 and isinstance(args[1], int) and abs(args[1]) > 10_000:
        raise _Refused("round() with too many digits")
    if name == "sum" and not all(_number(x) for x in args[0]):
        raise _Refused("sum() of non-numbers is not evaluated outside the sandbox")
    return getattr(builtins, name)(*args, **kwargs)


def _evaluate(node: Any, leaves: list[Any], used: list[int]) -> Any:
    kind = node[0]
    if kind == "leaf":
        value = leaves[node[1]]
        used.append(node[1])
        if isinstance(value, tuple) and len(value) == 2 and value[0] is _BAD:
            raise _Unusable(f"{node[1]}:{value[1]}")
        return value
    if kind == "const":
        return node[1]
    if kind in ("list", "tuple", "set"):
        items = [_evaluate(x, leaves, used) for x in node[1]]
        return {"list": list, "tuple": tuple, "set": set}[kind](items)
    if kind == "dict":
        return {_evaluate(k, leaves, used): _evaluate(v, leaves, used) for k, v in node[1]}
    if kind == "unary":
        value = _evaluate(node[2], leaves, used)
        if node[1] == "not":
            return not value
        return getattr(operator, node[1])(value)
    if kind == "bin":
        return _binop(node[1], _evaluate(node[2], leaves, used), _evaluate(node[3], leaves, used))
    if kind == "bool":
        value: Any = None
        for operand in node[2]:
            value = _evaluate(operand, leaves, used)
            if (node[1] == "and") != bool(value):
                return value
        return value
    if kind == "cmp":
        left = _evaluate(node[1], leaves, used)
        for op, right_node in node[2]:
            right = _evaluate(right_node, leaves, used)
            if not _compare(op, left, right):
                return False
            left = right
        return True
    if kind == "call":
        args = [_evaluate(a, leaves, used) for a in node[2]]
        kwargs = {k: _evaluate(v, leaves, used) for k, v in node[3].items()}
        return _call(node[1], args, kwargs)
    raise _Protocol(f"unknown skeleton node {kind}")


_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80
_short.maxlist = _short.maxtuple = _short.maxset = _short.maxfrozenset = _short.maxdict = 8
_short.maxlong = 60


def _brief(value: Any) -> str:
    if isinstance(value, _Length):
        return f"<object of length {value.n}>"
    try:
        return _short.repr(value)
    except Exception:  # noqa: BLE001 - repr of builtin data only fails on pathological sizes
        return "<value>"


# --------------------------------------------------------------------------------------------------
# Isolation: what we can use on this host, probed once.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Isolation:
    kind: str  # "bwrap" | "unshare" | "rlimits"
    python: str  # interpreter path as seen by the sandboxed process
    host_python: str
    bwrap: str | None = None
    extra_bwrap: tuple[str, ...] = ()
    binds: tuple[str, ...] = ()
    unshare: str | None = None
    setpriv: str | None = None
    namespaces: tuple[str, ...] = ()
    switch_uid: bool = False
    note: str = ""
    runner_code: bytes = b""


_RUNNER_SOURCE: str | None = None
_DETECTED: _Isolation | None = None
_DETECT_ERRORS: list[str] = []
_detect_lock = threading.Lock()


def _runner_source() -> str:
    global _RUNNER_SOURCE
    if _RUNNER_SOURCE is None:
        _RUNNER_SOURCE = (Path(__file__).with_name("_sandbox_child.py")).read_text(encoding="utf-8")
    return _RUNNER_SOURCE


def _precompile(host_python: str) -> bytes:
    """The runner compiled and marshalled by the sandbox's own interpreter (saves ~15 ms a run), or b''."""
    code = ("import marshal,sys;sys.stdout.buffer.write(marshal.dumps(compile(sys.stdin.read(),"
            "'<tunelab-runner>','exec',dont_inherit=True)))")
    try:
        done = subprocess.run([host_python, "-I", "-S", "-B", "-c", code], input=_runner_source().encode(),
                              capture_output=True, timeout=30, env={}, check=False)
    except (OSError, subprocess.SubprocessError):
        return b""
    return done.stdout if done.returncode == 0 else b""


def _interpreter() -> tuple[str, str, tuple[str, ...]]:
    """(path inside the sandbox, path on the host, extra bwrap bind arguments)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate, candidate, ()
    # Only the interpreter's own prefix is exposed (read-only, at a neutral path), never its parents.
    prefix = os.path.realpath(sys.base_prefix)
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    rel = os.path.relpath(exe, prefix)
    if rel.startswith(".."):
        return exe, exe, ()
    inside = "/opt/tunelab-python"
    return os.path.join(inside, rel), exe, ("--ro-bind", prefix, inside)


def _reachable_by_others(path: str) -> bool:
    """Whether another uid can reach `path` (every ancestor directory searchable by "others")."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        try:
            if not os.stat(os.sep.join(parts[:i])).st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _root_links() -> list[str]:
    args: list[str] = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _host_namespaces() -> dict[str, str]:
    out = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/ns"):
            with contextlib.suppress(OSError):
                out[name] = os.readlink(f"/proc/self/ns/{name}")
    return out


_PROBE_PROGRAM = """
import os
for name in sorted(os.listdir("/proc/self/ns")):
    print(name + "=" + os.readlink("/proc/self/ns/" + name))
"""
_NS_ORDER = ("user", "pid", "net", "ipc", "uts", "cgroup", "mnt")


def _probe(kind: str) -> _Isolation | None:
    """Try one isolation kind with a real run; return it (with the namespaces verified) or None."""
    python, host_python, binds = _interpreter()
    root = os.geteuid() == 0
    variants: list[_Isolation] = []
    if kind == "bwrap":
        bwrap = shutil.which("bwrap")
        if not bwrap:
            _DETECT_ERRORS.append("bwrap: not installed (apt-get install bubblewrap)")
            return None
        # A per-run uid needs an interpreter other uids can reach (not e.g. pyenv under /root); without
        # it the run maps to host root, for whom the kernel does not enforce RLIMIT_NPROC, and the
        # isolation text says so (the parent's process-count watchdog is then the fork-bomb limit).
        switch = root and _reachable_by_others(host_python)
        for extra in (("--disable-userns",), ()):
            variants.append(_Isolation("bwrap", python, host_python, bwrap=bwrap, extra_bwrap=extra,
                                       binds=binds, switch_uid=switch))
    elif kind == "unshare":
        unshare = shutil.which("unshare")
        setpriv = shutil.which("setpriv")
        if not unshare or (root and not setpriv):
            _DETECT_ERRORS.append("unshare: util-linux unshare/setpriv not found")
            return None
        variants.append(_Isolation("unshare", host_python, host_python, unshare=unshare, setpriv=setpriv,
                                   switch_uid=root))
    else:
        variants.append(_Isolation("rlimits", host_python, host_python, switch_uid=root))

    host_ns = _host_namespaces()
    compiled = _precompile(host_python)
    variants = [dataclasses.replace(v, runner_code=compiled) for v in variants]
    for iso in variants:
        plan = _analyse(_PROBE_PROGRAM, None)
        # a probe that merely ran out of time says nothing about the isolation (a loaded machine): retry
        # with more time rather than fall back to weaker isolation for the rest of the process
        for timeout in (15.0, 45.0, 120.0):
            result = _run(plan, iso, timeout=timeout, memory_mb=512)
            if result.status not in ("timeout", "killed"):
                break
        if result.status != "passed":
            _DETECT_ERRORS.append(f"{kind}: {result.status}: {result.reason} {result.stderr.strip()[-300:]}")
            continue
        inner = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        unshared = tuple(n for n in _NS_ORDER if n in inner and n in host_ns and inner[n] != host_ns[n])
        if kind == "bwrap" and not {"net", "pid", "mnt", "user"} <= set(unshared):
            _DETECT_ERRORS.append(f"bwrap: namespaces not all new ({unshared})")
            continue
        return dataclasses.replace(iso, namespaces=unshared)
    return None


def _detect() -> _Isolation:
    """The strongest isolation that works here (probed once per process, thread-safe)."""
    global _DETECTED
    with _detect_lock:
        if _DETECTED is None and not sys.platform.startswith("linux"):
            _DETECTED = _Isolation("none", sys.executable, sys.executable,
                                   note="the sandbox needs Linux (namespaces, seccomp, memfd, pidfd)")
        if _DETECTED is None:
            for kind in ("bwrap", "unshare", "rlimits"):
                iso = _probe(kind)
                if iso is not None:
                    if kind != "bwrap":
                        log.warning("sandbox: bubblewrap is not usable here (%s); falling back to %s. "
                                    "Install bubblewrap and allow unprivileged user namespaces for full "
                                    "isolation.", "; ".join(_DETECT_ERRORS)[:500], kind)
                    _DETECTED = iso
                    break
            else:
                # Still run (the caller gets sandbox_error results with the reasons) rather than raise, but
                # do not cache the failure: the next call probes again.
                none = _Isolation("none", *_interpreter()[:2], note="; ".join(_DETECT_ERRORS)[:1000])
                _DETECT_ERRORS.clear()
                return none
        return _DETECTED


def isolation_summary() -> str:
    """One line saying which isolation kind this process uses (probing it if needed)."""
    iso = _detect()
    if iso.kind == "none":
        return f"none: {iso.note}"
    ns = ",".join(iso.namespaces) or "no namespaces"
    return f"{iso.kind}:{ns}" + ("; per-run uid" if iso.switch_uid else "")


# --------------------------------------------------------------------------------------------------
# Running one program.
# --------------------------------------------------------------------------------------------------


def _argv(iso: _Isolation, uid: int | None, fds: tuple[int, int, int]) -> list[str]:
    source = "-" if iso.runner_code else _runner_source()
    tail = [iso.python, "-I", "-S", "-B", "-X", "utf8", "-c", _BOOTSTRAP, source, *map(str, fds)]
    if iso.kind == "bwrap":
        assert iso.bwrap is not None
        return [
            iso.bwrap, "--unshare-all", "--unshare-user", *iso.extra_bwrap, "--die-with-parent",
            "--new-session", "--cap-drop", "ALL", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--hostname", "sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8",
            "--ro-bind", "/usr", "/usr", *_root_links(), *iso.binds,
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(SHM_BYTES), "--perms", "1777", "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
            "--size", str(TMPFS_BYTES), "--perms", "1777", "--tmpfs", "/tmp",
            "--remount-ro", "/", "--chdir", "/tmp", "--", *tail,
        ]
    if iso.kind == "unshare":
        assert iso.unshare is not None
        ns = ["--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--ipc", "--uts"]
        if uid is not None:
            assert iso.setpriv is not None
            return [iso.unshare, *ns, "--", iso.setpriv, "--reuid", str(uid), "--regid", str(uid),
                    "--clear-groups", "--", *tail]
        return [iso.unshare, "--user", "--map-current-user", *ns, "--", *tail]
    return tail


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as fh:
                status = fh.read(4096)
        except OSError:
            continue
        state = uids = None
        for line in status.split(b"\n"):
            if line.startswith(b"State:"):
                state = line.split()[1:2]
            elif line.startswith(b"Uid:"):
                uids = line.split()[1:]
                break
        if uids and str(uid).encode() in uids and state != [b"Z"]:
            pids.append(int(entry))
    return pids


def _kill_all(find: Callable[[], list[int]], ours: Callable[[int, set[int]], bool], exclude: int | None,
              deadline: float) -> None:
    """SIGKILL every process `find()` lists until none is left. Each pid is pinned with a pidfd and checked
    again before the signal, so a pid reused by an unrelated process in between is never hit."""
    while time.monotonic() < deadline:
        listed = set(find())
        pids = [p for p in listed if p != exclude]
        if not pids:
            return
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if ours(pid, listed):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(pidfd)
        time.sleep(0.005)


def _has_uid(pid: int, uid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh.read(4096).split(b"\n"):
                if line.startswith(b"Uid:"):
                    return str(uid).encode() in line.split()[1:]
    except OSError:
        pass
    return False


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _terminate(proc: subprocess.Popen[bytes], uid: int | None, inner_first: bool) -> None:
    """Kill the whole tree. Under bwrap the processes inside go first, so the outer bwrap reaps its child
    and exits by itself: killing it first would orphan its init to the host's pid 1, which may never
    reap it. With a per-run uid every process of the run is found by uid, else by parentage."""
    if uid is not None:
        def find() -> list[int]:
            return _pids_of_uid(uid)

        def ours(pid: int, listed: set[int]) -> bool:
            return _has_uid(pid, uid)
    else:
        def find() -> list[int]:
            return _descendants(proc.pid)

        def ours(pid: int, listed: set[int]) -> bool:
            return _parent_of(pid) in listed

    if inner_first and proc.poll() is None:
        _kill_all(find, ours, proc.pid, time.monotonic() + 3.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)
    if uid is not None:
        _kill_all(find, ours, None, time.monotonic() + 3.0)


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


class _Monitor:
    """Parent side of one run: reads output with caps, validates records, keeps the wall clock."""

    def __init__(self, plan: _Plan, nonce: str, timeout: float, memory_mb: int) -> None:
        self.plan = plan
        self.nonce = nonce
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.out = bytearray()
        self.err = bytearray()
        self.out_over = self.err_over = False
        self.chan = bytearray()
        self.chan_total = 0
        self.main_pid: int | None = None
        self.ready: dict[str, Any] | None = None
        self.ready_at: float | None = None
        self.next_stmt = 0
        self.seen_ok: set[int] = set()
        self.checks_ok = 0
        self.verdict: tuple[str, str] | None = None
        self.ack_fd = -1

    # -- reasons ------------------------------------------------------------------------------------
    def line(self, filename: str, lineno: int | None) -> str:
        lines = self.plan.setup_lines if filename == "<setup>" else self.plan.lines
        if lineno and 1 <= lineno <= len(lines):
            return " ".join(lines[lineno - 1].split())[:200]
        return ""

    def where(self, filename: str, lineno: int | None) -> str:
        if not lineno:
            return ""
        what = "setup line" if filename == "<setup>" else "line"
        src = self.line(filename, lineno)
        return f"{what} {lineno}" + (f": `{src}`" if src else "")

    def stmt_where(self, index: int) -> str:
        if 0 <= index < len(self.plan.stmt_lines):
            return self.where("<program>", self.plan.stmt_lines[index])
        return ""

    def decide(self, status: str, reason: str) -> None:
        if self.verdict is None:
            self.verdict = (status, reason)

    # -- records ------------------------------------------------------------------------------------
    def feed_channel(self, data: bytes) -> None:
        self.chan_total += len(data)
        if self.chan_total > _CHANNEL_LIMIT:
            self.decide("error", "the program sent more than 64 MiB of check values (stopped)")
            return
        self.chan += data
        while self.verdict is None:
            nl = self.chan.find(b"\n")
            if nl < 0:
                if len(self.chan) > _RECORD_LIMIT:
                    self.decide("error", "invalid record on the result channel (over 16 MiB); the program "
                                         "tampered with the runner")
                return
            line = bytes(self.chan[:nl])
            del self.chan[: nl + 1]
            try:
                self.record(line)
            except Exception as exc:  # noqa: BLE001 - any malformed record is the program's doing
                self.decide("error", f"invalid record on the result channel ({exc}); "
                                     "the program tampered with the runner")

    def record(self, line: bytes) -> None:
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            raise _Protocol("not JSON") from None
        if not (isinstance(rec, list) and len(rec) >= 3 and isinstance(rec[2], str)):
            raise _Protocol("bad shape")
        if rec[0] != self.nonce:
            raise _Protocol("wrong nonce")
        pid, kind, payload = rec[1], rec[2], rec[3:]
        if self.main_pid is None:
            if kind != "ready" or not isinstance(pid, int) or len(payload) != 1 or not isinstance(payload[0], dict):
                raise _Protocol("first record is not 'ready'")
            self.main_pid = pid
            self.ready = payload[0]
            self.ready_at = time.monotonic()
            return
        if pid != self.main_pid:
            raise _Protocol("record from another process")
        if kind == "stmt":
            if payload != [self.next_stmt]:
                raise _Protocol("statements out of order")
            self.next_stmt += 1
        elif kind == "check":
            self.check(payload)
        elif kind == "error":
            if len(payload) != 1 or not isinstance(payload[0], dict):
                raise _Protocol("bad error record")
            self.error(payload[0])
        elif kind == "end":
            self.end(payload)
        else:
            raise _Protocol(f"unexpected record {kind!r}")

    def check(self, payload: list[Any]) -> None:
        if len(payload) != 2 or not isinstance(payload[0], int) or not isinstance(payload[1], list):
            raise _Protocol("bad check record")
        cid, raw = payload
        if not 0 <= cid < len(self.plan.checks):
            raise _Protocol("unknown check id")
        check = self.plan.checks[cid]
        if len(raw) != len(check.modes):
            raise _Protocol("wrong number of values")
        leaves = [_decode_leaf(r, m) for r, m in zip(raw, check.modes, strict=True)]
        where = f"line {check.lineno}: `{check.source}`"
        used: list[int] = []
        try:
            ok = bool(_evaluate(check.skeleton, leaves, used))
        except _Unusable as exc:
            index, _, why = str(exc).partition(":")
            self.decide("failed", f"assertion at {where} cannot be verified: `{check.leaves[int(index)]}` "
                                  f"gave {why}; only builtin data (None, bool, numbers, str, bytes, list, tuple, "
                                  "dict, set) is compared outside the sandbox")
            return
        except _Refused as exc:
            self.decide("error", f"assertion at {where}: {exc}")
            return
        except (_Protocol, RecursionError):
            raise
        except Exception as exc:  # noqa: BLE001 - any Python error the assert itself would raise
            self.decide("error", f"{type(exc).__name__}: {exc} (while evaluating the assertion at {where})")
            return
        if not ok:
            shown = []
            for i in dict.fromkeys(used):
                shown.append(f"`{check.leaves[i]}` = {_brief(leaves[i])}")
            detail = ("; " + ", ".join(shown[:4])) if shown else ""
            self.decide("failed", f"assertion failed at {where}{detail}")
            return
        self.checks_ok += 1
        self.seen_ok.add(cid)
        with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
            os.write(self.ack_fd, b"k")

    def error(self, info: dict[str, Any]) -> None:
        frames = [f for f in info.get("frames", []) if isinstance(f, list) and len(f) == 3
                  and isinstance(f[0], str) and isinstance(f[1], int)]
        name = str(info.get("type", "Exception"))[:100]
        message = str(info.get("message", ""))[:1000]
        stage = info.get("stage")
        label = f"{name}: {message}" if message else name
        if stage in ("compile", "setup-compile"):
            filename = "<setup>" if stage == "setup-compile" else "<program>"
            lineno = info.get("lineno") if isinstance(info.get("lineno"), int) else None
            where = self.where(filename, lineno)
            prefix = "setup code: " if stage == "setup-compile" else ""
            self.decide("error", f"{prefix}{label}" + (f" ({where})" if where else ""))
            return
        inner = frames[-1] if frames else None
        outer = frames[0] if frames else None
        stmt = info.get("stmt") if isinstance(info.get("stmt"), int) else -1
        if stage == "setup":
            where = self.where("<setup>", inner[1]) if inner else ""
            self.decide("error", f"setup code raised {label}" + (f" ({where})" if where else ""))
            return
        place = self.where(inner[0], inner[1]) if inner else self.stmt_where(stmt)
        if outer and inner and outer[:2] != inner[:2]:
            place += f", called from {self.where(outer[0], outer[1])}"
        suffix = f" at {place}" if place else ""
        if info.get("exit") is True:
            self.decide("error", f"the program raised {label}{suffix} before finishing; exiting early "
                                 "never counts as passing")
        elif info.get("memory") is True:
            self.decide("memory_limit", f"{label}{suffix} (memory limit {self.memory_mb} MiB)")
        elif info.get("assertion") is True:
            self.decide("failed", f"{label or 'AssertionError'}{suffix}")
        else:
            self.decide("error", f"{label}{suffix}")

    def end(self, payload: list[Any]) -> None:
        n = len(self.plan.stmt_lines)
        if payload != [n] or self.next_stmt != n:
            raise _Protocol("end before all statements finished")
        missing = [c for c in self.plan.checks if c.mandatory and c.cid not in self.seen_ok]
        if missing:
            c = missing[0]
            self.decide("failed", f"the assertion at line {c.lineno} (`{c.source}`) never ran although the "
                                  "program finished; the tests were bypassed")
            return
        self.decide("passed", "all statements ran to the end" + (
            f"; {self.checks_ok} assertion(s) checked outside the sandbox" if self.checks_ok else ""))

    # -- output -------------------------------------------------------------------------------------
    def append_output(self, which: str, data: bytes) -> bool:
        """Keep output up to the cap; True when this chunk went over it."""
        buf = self.out if which == "stdout" else self.err
        room = OUTPUT_LIMIT - len(buf)
        buf += data[: max(room, 0)]
        if len(data) <= room:
            return False
        if which == "stdout":
            self.out_over = True
        else:
            self.err_over = True
        return True

    def feed_output(self, which: str, data: bytes) -> None:
        if self.append_output(which, data):
            self.decide("output_limit", f"the program wrote more than {OUTPUT_LIMIT // 1024} KiB to {which}")


def _isolation_text(iso: _Isolation, ready: dict[str, Any] | None) -> str:
    if ready is None:
        return f"{iso.kind} (sandbox did not start)"
    uid = ready.get("uid")
    seccomp = ready.get("seccomp")
    rl = ready.get("rlimits") or []
    tail = (f"seccomp:{seccomp}" if seccomp else "no-seccomp") + ";rlimits:" + ",".join(map(str, rl))
    if iso.kind == "bwrap":
        host_root = "" if iso.switch_uid or os.geteuid() != 0 else ";host-uid=root(nproc-not-enforced)"
        return (f"bwrap:{','.join(iso.namespaces)};uid={uid}{host_root};fs:ro-usr,"
                f"tmpfs-tmp({TMPFS_BYTES >> 20}MiB),no-host-home;{tail}")
    if iso.kind == "unshare":
        return (f"unshare:{','.join(iso.namespaces) or 'none'};uid={uid};fs:host-visible(read by uid "
                f"permissions);{tail}")
    same = "" if iso.switch_uid else ",same-uid-as-evaluator"
    return f"rlimits-only (no namespaces: host file system visible{same});uid={uid};{tail}"


def _run(plan: _Plan, iso: _Isolation, timeout: float, memory_mb: int) -> ExecutionResult:
    t0 = time.monotonic()
    if iso.kind == "none":
        return ExecutionResult(False, "sandbox_error", f"no usable sandbox on this host: {iso.note}",
                               isolation="none")
    uid = secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0] if iso.switch_uid else None
    nonce = secrets.token_hex(16)
    no_pidns = "pid" not in iso.namespaces
    job = {
        "nonce": nonce,
        "program": plan.program,
        "setup": plan.setup,
        "leaf_modes": [c.modes for c in plan.checks],
        "limits": {
            "cpu_s": math.ceil(timeout) + 1,
            "as_bytes": memory_mb * 1024 * 1024,
            "fsize_bytes": FILE_SIZE_LIMIT,
            "nofile": NOFILE_LIMIT,
            "nproc": NPROC_LIMIT,
            # Sharing the evaluator's uid outside a user namespace: the count includes its processes.
            "nproc_relative": uid is None and iso.kind != "bwrap",
        },
        # Mapped to host root, the kernel does not enforce RLIMIT_NPROC: forbid new processes instead.
        "seccomp": {"guard_kill": no_pidns,
                    "deny_fork": iso.kind == "bwrap" and not iso.switch_uid and os.geteuid() == 0},
    }
    workdir: str | None = None
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    if iso.kind != "bwrap":
        workdir = tempfile.mkdtemp(prefix="tunelab-sandbox-")
        if uid is not None:
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        env.update(HOME=workdir, TMPDIR=workdir)
    job_fd = os.memfd_create("tunelab-job")
    chan_r, chan_w = os.pipe()
    ack_r, ack_w = os.pipe()
    proc: subprocess.Popen[bytes] | None = None
    monitor = _Monitor(plan, nonce, timeout, memory_mb)
    monitor.ack_fd = ack_w
    try:
        # The job holds only str/int/bool/None/list/dict, whose marshal format is stable across 3.x.
        payload = len(iso.runner_code).to_bytes(8, "little") + iso.runner_code + marshal.dumps(job, 4)
        view = memoryview(payload)
        while view:
            view = view[os.write(job_fd, view):]
        os.lseek(job_fd, 0, os.SEEK_SET)
        kwargs: dict[str, Any] = {}
        if uid is not None and iso.kind in ("bwrap", "rlimits"):
            kwargs = {"user": uid, "group": uid, "extra_groups": []}
        try:
            proc = subprocess.Popen(
                _argv(iso, uid, (job_fd, chan_w, ack_r)), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, pass_fds=(job_fd, chan_w, ack_r), env=env, cwd=workdir or "/",
                start_new_session=True, **kwargs)
        except OSError as exc:
            return ExecutionResult(False, "sandbox_error", f"could not start the sandbox: {exc}",
                                   duration=time.monotonic() - t0, isolation=f"{iso.kind} (did not start)")
        finally:
            for fd in (job_fd, chan_w, ack_r):
                os.close(fd)
        os.set_blocking(ack_w, False)
        _watch(proc, monitor, chan_r, t0, timeout, uid)
        _terminate(proc, uid, iso.kind == "bwrap")
        _drain(proc, monitor, chan_r)
        return _result(proc, monitor, iso, t0, timeout)
    finally:
        if proc is not None and proc.poll() is None:
            _terminate(proc, uid, iso.kind == "bwrap")
        for fd in (chan_r, ack_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if proc is not None:
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _descendants(root: int) -> list[int]:
    """`root` and its live (non-zombie) descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _tree_usage(uid: int | None, root: int) -> tuple[int, int]:
    """(process count, proportional resident memory in bytes) of all the run's processes."""
    pids = _pids_of_uid(uid) if uid is not None else _descendants(root)
    if len(pids) < 3:  # bwrap + its init + one program process: RLIMIT_AS already bounds that one
        return len(pids), 0
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
                for line in fh:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            continue
    return len(pids), total


def _watch(proc: subprocess.Popen[bytes], monitor: _Monitor, chan_r: int, t0: float, timeout: float,
           uid: int | None = None) -> bool:
    """Pump output and records until a verdict, the deadline, or the process exits; True if it exited.

    RLIMIT_AS caps each process, not their sum, so while the program runs the whole tree's memory is
    polled too: a fork bomb that allocates in every child would otherwise reach NPROC x memory_mb.
    """
    assert proc.stdout is not None and proc.stderr is not None
    sel = selectors.DefaultSelector()
    streams = {chan_r: "chan", proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    pidfd: int | None = None
    try:
        pidfd = os.pidfd_open(proc.pid)
        sel.register(pidfd, selectors.EVENT_READ)
    except (OSError, AttributeError):
        pidfd = None
    budget = monitor.memory_mb * 1024 * 1024
    next_poll = t0 + 0.2
    try:
        while monitor.verdict is None:
            now = time.monotonic()
            deadline = (monitor.ready_at + timeout) if monitor.ready_at is not None else (
                t0 + max(STARTUP_LIMIT, timeout))
            if monitor.ready_at is not None and now >= next_poll:
                count, used = _tree_usage(uid, proc.pid)
                if used > budget:
                    monitor.decide("memory_limit", f"the program's processes together used {used >> 20} MiB, "
                                                   f"over the memory limit of {monitor.memory_mb} MiB")
                    return False
                if count > NPROC_LIMIT + 8:  # only reachable where the kernel does not enforce NPROC
                    monitor.decide("killed", f"the program started {count} processes (limit {NPROC_LIMIT})")
                    return False
                next_poll = time.monotonic() + _MEMORY_POLL
            if now >= deadline:
                if monitor.ready_at is None:
                    monitor.decide("sandbox_error", f"the sandbox did not start within {deadline - t0:.0f} s")
                else:
                    monitor.decide("timeout", f"timed out after {timeout:g} s (wall clock); the whole process "
                                              "tree was killed")
                return False
            wait = deadline - now if pidfd is not None else min(deadline - now, 0.05)
            if monitor.ready_at is not None:
                wait = min(wait, max(next_poll - now, 0.0))
            events = sel.select(wait)
            # Records first: a verdict already on the channel wins over output that raced it.
            for key, _ in sorted(events, key=lambda e: streams.get(e[0].fd) != "chan"):
                fd = key.fd
                if fd == pidfd:
                    continue
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(fd)
                    continue
                if streams[fd] == "chan":
                    monitor.feed_channel(data)
                else:
                    monitor.feed_output(streams[fd], data)
                if monitor.verdict is not None:
                    return False
            # Closing its pipes does not end a run; only the process exiting (or the deadline) does.
            if proc.poll() is not None:
                return True
        return False
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)


def _drain(proc: subprocess.Popen[bytes], monitor: _Monitor, chan_r: int) -> None:
    """After the tree is dead: read what is still buffered (records written just before exit, output)."""
    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + 2.0
    for fd, which in ((chan_r, "chan"), (proc.stdout.fileno(), "stdout"), (proc.stderr.fileno(), "stderr")):
        while time.monotonic() < deadline:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                time.sleep(0.005)
                continue
            except OSError:
                break
            if not data:
                break
            if which == "chan":
                if monitor.verdict is None:
                    monitor.feed_channel(data)
            else:  # after exit: only keep the output; _result turns an overflow into the verdict
                monitor.append_output(which, data)


def _result(proc: subprocess.Popen[bytes], monitor: _Monitor, iso: _Isolation, t0: float,
            timeout: float) -> ExecutionResult:
    rc = proc.returncode
    verdict = monitor.verdict
    if verdict is not None and verdict[0] == "passed" and (monitor.out_over or monitor.err_over):
        which = "stdout" if monitor.out_over else "stderr"
        verdict = ("output_limit", f"the program wrote more than {OUTPUT_LIMIT // 1024} KiB to {which}")
    if verdict is None:
        stderr_tail = monitor.err.decode("utf-8", "replace").strip()[-500:]
        if monitor.ready is None:
            verdict = ("sandbox_error", f"the sandbox failed to start (exit status {rc})"
                       + (f": {stderr_tail}" if stderr_tail else ""))
        else:
            sig = -rc if rc is not None and rc < 0 else (rc - 128 if rc is not None and 128 < rc < 128 + 65 else 0)
            during = monitor.stmt_where(monitor.next_stmt)
            during = f" while running {during}" if during else ""
            if sig == signal.SIGXCPU:
                verdict = ("timeout", f"CPU time limit ({math.ceil(timeout) + 1} s) exceeded{during}")
            elif sig == signal.SIGXFSZ:
                verdict = ("killed", f"killed by SIGXFSZ: file size limit ({FILE_SIZE_LIMIT >> 20} MiB) "
                                     f"exceeded{during}")
            elif sig:
                memory_hint = "MemoryError" in stderr_tail or "Cannot allocate memory" in stderr_tail
                name = _signal_name(sig)
                if memory_hint:
                    verdict = ("memory_limit", f"killed by {name} after running out of memory "
                                               f"({monitor.memory_mb} MiB){during}")
                else:
                    hint = " (a crash, e.g. C stack overflow or ctypes)" if sig in (
                        signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL) else ""
                    verdict = ("killed", f"killed by {name}{hint}{during}")
            else:
                verdict = ("error", f"the program exited (status {rc}) before it finished{during}; "
                                    "exit codes are never taken as a pass")
    status, reason = verdict
    return ExecutionResult(
        passed=status == "passed",
        status=status,
        reason=reason,
        stdout=monitor.out.decode("utf-8", "replace"),
        stderr=monitor.err.decode("utf-8", "replace"),
        duration=time.monotonic() - t0,
        isolation=_isolation_text(iso, monitor.ready),
        checks=monitor.checks_ok,
        returncode=rc,
    )


# --------------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------------


def _validate(timeout: float, memory_mb: int) -> None:
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not (isinstance(memory_mb, int) and memory_mb >= 64):
        raise ValueError(f"memory_mb must be an int >= 64, got {memory_mb!r}")


def _execute(program: str, setup: str | None, timeout: float, memory_mb: int,
             iso: _Isolation | None = None) -> ExecutionResult:
    _validate(timeout, memory_mb)
    t0 = time.monotonic()
    try:
        plan = _analyse(program, setup)
    except _ProgramError as exc:
        return ExecutionResult(False, "error", str(exc), duration=time.monotonic() - t0,
                               isolation="none (not executed)")
    try:
        return _run(plan, iso or _detect(), timeout, memory_mb)
    except OSError as exc:  # the host ran out of something (fds, memory, pids): not the program's verdict
        return ExecutionResult(False, "sandbox_error", f"host error while running the sandbox: {exc}",
                               duration=time.monotonic() - t0, isolation="none (not executed)")


ALLOW_WEAK_ENV = "TUNELAB_ALLOW_WEAK_SANDBOX"


def allow_weak_isolation(allow: bool = True) -> None:
    """Accept running model code with weaker isolation than bubblewrap's (the user's explicit opt-in). Set in the
    environment, so the processes tunelab starts (compare cells, search trials) inherit the choice."""
    if allow:
        os.environ[ALLOW_WEAK_ENV] = "1"
    else:
        os.environ.pop(ALLOW_WEAK_ENV, None)


def _require_full_isolation(iso: _Isolation) -> None:
    """Safe by default: without bubblewrap's isolation, refuse to run model code unless the user opted in."""
    if iso.kind == "bwrap" or os.environ.get(ALLOW_WEAK_ENV) == "1":
        return
    from tunelab.errors import UserError

    why = "; ".join(_DETECT_ERRORS)[:200] or iso.note or f"only '{iso.kind}' isolation works here"
    raise UserError(
        f"code evaluation runs model-written programs and needs bubblewrap's isolation, which is not usable here ({why}); "
        "install it (apt-get install bubblewrap) and allow unprivileged user namespaces, or accept weaker isolation "
        f"explicitly: --allow-weak-sandbox, eval.allow_weak_sandbox: true, or {ALLOW_WEAK_ENV}=1"
    )


def check_isolation() -> None:
    """Raise UserError now if model code could not run with full isolation here and the user did not opt in."""
    _require_full_isolation(_detect())


def execute(program: str, *, timeout: float = 10.0, memory_mb: int = 1024,
            setup: str | None = None) -> ExecutionResult:
    """Run `program` (candidate code followed by its tests) in a fresh sandboxed interpreter.

    `setup` is trusted code run first in the same namespace (e.g. MBPP ``test_setup_code``). `timeout` is
    wall-clock seconds from the moment the sandbox is ready; `memory_mb` caps the address space of each
    process. Never raises for anything the program does; invalid arguments raise ValueError/TypeError; without
    bubblewrap, UserError unless weaker isolation was accepted (`allow_weak_isolation`).
    """
    _validate(timeout, memory_mb)
    iso = _detect()
    _require_full_isolation(iso)
    return _execute(program, setup, timeout, memory_mb, iso)


ProgramSpec = str | tuple[str, str | None]


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def execute_many(programs: Sequence[ProgramSpec], *, workers: int | None = None, timeout: float = 10.0,
                 memory_mb: int = 1024,
                 on_result: Callable[[int, ExecutionResult], None] | None = None) -> list[ExecutionResult]:
    """Run many programs, at most `workers` at a time (default and cap: the usable CPU cores, so one
    program's timeout is not eaten by another's CPU use); results come back in input order.

    Each item is a program string or a ``(program, setup)`` pair. `on_result(index, result)` is called
    as results arrive (from worker threads), e.g. for a progress bar.
    """
    _validate(timeout, memory_mb)
    items: list[tuple[str, str | None]] = []
    for p in programs:
        if isinstance(p, str):
            items.append((p, None))
        elif isinstance(p, tuple) and len(p) == 2:
            items.append((p[0], p[1]))
        else:
            raise TypeError("each program must be a str or a (program, setup) tuple")
    if not items:
        return []
    cores = _available_cores()
    n = max(1, min(workers or cores, cores, len(items)))
    iso = _detect()
    _require_full_isolation(iso)

    def one(index: int) -> ExecutionResult:
        program, setup = items[index]
        result = _execute(program, setup, timeout, memory_mb, iso)
        if on_result is not None:
            on_result(index, result)
        return result

    if n == 1:
        return [one(i) for i in range(len(items))]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="tunelab-sandbox") as pool:
        return list(pool.map(one, range(len(items))))
