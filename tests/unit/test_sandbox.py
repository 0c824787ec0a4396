"""Functional tests of the code sandbox: correct programs pass, failures say why, Python semantics hold.

The hostile programs live in test_sandbox_adversarial.py. Every test here starts real sandboxed
interpreters (about 0.1 s each), with short timeouts.
"""

from __future__ import annotations

import shutil
import time

import pytest
from conftest import need

from tunelab.evaluate import sandbox
from tunelab.evaluate.sandbox import STATUSES, ExecutionResult, execute, execute_many

ADD = "def add(a, b):\n    return a + b\n"
T = 3.0
MEM = 256


def run(program: str, **kw: object) -> ExecutionResult:
    kw.setdefault("timeout", T)
    kw.setdefault("memory_mb", MEM)
    result = execute(program, **kw)  # type: ignore[arg-type]
    assert result.status in STATUSES
    assert result.passed == (result.status == "passed")
    return result


def test_isolation_is_detected_and_honest() -> None:
    summary = sandbox.isolation_summary()
    assert not summary.startswith("none"), summary
    result = run(ADD + "assert add(1, 2) == 3\n")
    assert result.passed, result.reason
    if summary.startswith("bwrap"):
        for part in ("bwrap:", "net", "pid", "user", "uid=65534", "seccomp:", "rlimits:"):
            assert part in result.isolation
    else:
        assert not result.isolation.startswith("bwrap")


def test_installed_bubblewrap_is_actually_used() -> None:
    need(shutil.which("bwrap") is not None, "bubblewrap is not installed (.ci/run installs it: apt-get install bubblewrap)")
    # bwrap present but unusable (user namespaces blocked by Docker's seccomp profile or AppArmor) would
    # silently degrade every run to a fallback; say so loudly instead.
    assert sandbox.isolation_summary().startswith("bwrap"), sandbox._DETECT_ERRORS


def test_correct_program_passes() -> None:
    result = run(ADD + "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add('a', 'b') == 'ab'\n")
    assert result.status == "passed"
    assert result.checks == 3
    assert 0 < result.duration < 5
    assert result.stdout == result.stderr == ""


def test_empty_program_and_no_asserts_pass() -> None:
    assert run("").passed
    assert run("x = 1\ny = x + 1\n").passed


def test_failing_assert_reports_which_assert_and_the_value() -> None:
    result = run("def add(a, b):\n    return a - b\n\nassert add(0, 0) == 0\nassert add(2, 3) == 5\n"
                 "assert add(1, 1) == 2\n")
    assert result.status == "failed"
    assert "line 5" in result.reason
    assert "assert add(2, 3) == 5" in result.reason
    assert "-1" in result.reason
    assert result.checks == 1  # the first assert held; the run stopped at the second


def test_failing_assert_inside_humaneval_check() -> None:
    program = ADD + (
        "\n\nMETADATA = {}\n\n\ndef check(candidate):\n"
        "    assert candidate(1, 1) == 2\n"
        "    assert candidate(2, 2) == 5, 'two plus two'\n"
        "\n\ncheck(add)\n")
    result = run(program)
    assert result.status == "failed"
    assert "line 10" in result.reason and "candidate(2, 2) == 5" in result.reason
    assert "`candidate(2, 2)` = 4" in result.reason


def test_humaneval_shaped_program_passes() -> None:
    program = (
        "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    \"\"\"Check if any two numbers are closer than threshold.\"\"\"\n"
        "    for i, a in enumerate(numbers):\n"
        "        for j, b in enumerate(numbers):\n"
        "            if i != j and abs(a - b) < threshold:\n"
        "                return True\n"
        "    return False\n\n\n"
        "METADATA = {'author': 'jt', 'dataset': 'test'}\n\n\n"
        "def check(candidate):\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
        "    assert abs(len(str(candidate([1.0], 0.5))) - 5) < 1e-6\n"
        "    for n in range(3):\n"
        "        assert candidate([float(n), float(n) + 0.1], 0.2)\n"
        "\n\ncheck(has_close_elements)\n")
    result = run(program)
    assert result.passed, result.reason
    assert result.checks == 6


def test_mbpp_shaped_program_with_crlf_passes() -> None:
    code = "def similar_elements(a, b):\r\n    return tuple(set(a) & set(b))\r\n"
    tests = ["assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))",
             "assert set(similar_elements((1, 2, 3, 4), (5, 4, 3, 7))) == set((3, 4))"]
    result = run(code + "\n" + "\n".join(tests) + "\n")
    assert result.passed, result.reason
    assert result.checks == 2


def test_plain_assert_in_helper_function_reports_message() -> None:
    result = run("def add(a, b):\n    assert isinstance(a, str), 'wants text'\n    return a + b\n"
                 "assert add(1, 2) == 3\n")
    assert result.status == "failed"
    assert "wants text" in result.reason and "line 2" in result.reason and "line 4" in result.reason


def test_syntax_error_is_an_error_with_the_line() -> None:
    result = run("def add(a, b)\n    return a + b\n")
    assert result.status == "error"
    assert "SyntaxError" in result.reason and "line 1" in result.reason
    assert result.isolation == "none (not executed)"


def test_compile_time_error_found_by_the_sandbox() -> None:
    # The parser accepts this; only the compiler rejects it, and nothing may run before that.
    result = run("print('ran')\nreturn 5\n")
    assert result.status == "error"
    assert "SyntaxError" in result.reason and "outside function" in result.reason
    assert result.stdout == ""


def test_runtime_exception_reports_type_message_and_place() -> None:
    result = run("def get(d):\n    return d['key']\n\nassert get({}) == 1\n")
    assert result.status == "error"
    assert "KeyError: 'key'" in result.reason
    assert "line 2" in result.reason and "line 4" in result.reason
    assert "Traceback" in result.stderr


def test_setup_code_is_run_first_in_the_same_namespace() -> None:
    setup = "import math\nclass Node:\n    def __init__(self, v):\n        self.v = v\n"
    program = "def depth(n):\n    return math.floor(n.v)\nassert depth(Node(2.7)) == 2\n"
    assert run(program, setup=setup).passed
    assert run(program).status == "error"  # without the setup, Node does not exist


def test_setup_errors_are_reported_as_setup() -> None:
    assert "setup" in run("x = 1\n", setup="raise ValueError('bad setup')\n").reason
    bad = run("x = 1\n", setup="def broken(:\n")
    assert bad.status == "error" and "setup" in bad.reason


def test_stdout_and_stderr_are_captured() -> None:
    result = run("import sys\nprint('hello')\nprint('oops', file=sys.stderr)\nassert 2 + 2 == 4\n")
    assert result.passed
    assert result.stdout == "hello\n" and result.stderr == "oops\n"


def test_output_printed_before_a_failing_assert_is_kept() -> None:
    result = run("print('before')\nassert 1 == 2\n")
    assert result.status == "failed" and result.stdout == "before\n"


def test_working_dir_is_fresh_empty_and_writable() -> None:
    program = ("import os\nassert os.listdir('.') == []\n"
               "open('note.txt', 'w').write('x')\nassert open('note.txt').read() == 'x'\n")
    first, second = run(program), run(program)
    assert first.passed and second.passed, (first.reason, second.reason)


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELAB_TEST_TOKEN", "s3cr3t-value")
    result = run("import os\nprint(sorted(os.environ))\nassert 'TUNELAB_TEST_TOKEN' not in os.environ\n")
    assert result.passed, result.reason
    assert "s3cr3t" not in result.stdout


PASSING_SEMANTICS = [
    "assert 4 == 4.0 and True == 1 and 1.0 == True",
    "assert [1, 2] != (1, 2)",
    "assert 0.1 + 0.2 != 0.3",
    "import math\nassert math.isclose(0.1 + 0.2, 0.3)",
    "assert abs((0.1 + 0.2) - 0.3) < 1e-9",
    "assert round(2.675, 2) == 2.67",
    "assert float('inf') > 10 ** 300 and float('nan') != float('nan')",
    "from collections import Counter, OrderedDict, namedtuple\nP = namedtuple('P', 'x y')\n"
    "assert Counter('aab') == {'a': 2, 'b': 1}\nassert P(1, 2) == (1, 2)\nassert OrderedDict(a=1) == {'a': 1}",
    "def gen(n):\n    yield from range(n)\nassert list(gen(3)) == [0, 1, 2]\nassert sorted(gen(3), reverse=True) == [2, 1, 0]\n"
    "assert sum(gen(4)) == 6 and max(gen(4)) == 3 and len(list(gen(2))) == 2\nassert set(gen(2)) == {0, 1}",
    "class Box:\n    def __len__(self):\n        return 7\nassert len(Box()) == 7",
    "def f():\n    return None\nassert f() is None\nassert f() is not False",
    "assert 2 in [1, 2, 3] and 5 not in {1: 2}",
    "assert 1 < 2 < 3 and not (3 < 2 < 4)",
    "x = 0\nassert x == 0 or 1 / x > 0",
    "assert b'ab' + b'c' == b'abc' and bytearray(b'x') == b'x'",
    "assert {'a': [1, {2, 3}], 'b': (4.5, None)} == {'b': (4.5, None), 'a': [1, {3, 2}]}",
    "assert 2 ** 100 == 1267650600228229401496703205376 and -7 // 2 == -4 and 7 % 3 == 1",
    "assert 'héllo ✓' == 'héllo ✓' and len('日本') == 2",
    "assert (1 + 2j) * 2 == 2 + 4j",
    "str = 'shadowed'\nassert str == 'shadowed'\ndef sorted(x):\n    return 'mine'\nassert sorted([2, 1]) == 'mine'",
    "if __name__ == '__main__':\n    assert 1 + 1 == 2",
    "from __future__ import annotations\ndef f(x: NotDefinedAnywhere) -> int:\n    return 1\nassert f(0) == 1",
    "import pickle\nclass A:\n    pass\nassert type(pickle.loads(pickle.dumps(A()))).__name__ == 'A'",
    "assert [i * i for i in range(4)] == [0, 1, 4, 9]",
    "assert True, 'message'\nassert [1]",
]


@pytest.mark.parametrize("program", PASSING_SEMANTICS, ids=[f"sem{i}" for i in range(len(PASSING_SEMANTICS))])
def test_python_semantics_are_preserved(program: str) -> None:
    result = run(program + "\n")
    assert result.passed, result.reason


FAILING_SEMANTICS = [
    ("assert [1, 2] == (1, 2)", "failed"),
    ("assert 0.1 + 0.2 == 0.3", "failed"),
    ("assert not [0]", "failed"),
    ("assert 1 < 3 < 2", "failed"),
    ("def gen():\n    yield 1\nassert gen() == [1]", "failed"),  # a generator is not a list
    ("assert 'a' < 1", "error"),  # TypeError, as in Python
    ("assert 1 / 0 == 1", "error"),
]


@pytest.mark.parametrize("program,status", FAILING_SEMANTICS, ids=[f"fail{i}" for i in range(len(FAILING_SEMANTICS))])
def test_python_semantics_of_failures(program: str, status: str) -> None:
    result = run(program + "\n")
    assert result.status == status, result.reason


def test_values_that_are_not_data_cannot_pass_and_say_why() -> None:
    result = run("import types\ndef f():\n    return types.SimpleNamespace(a=1)\nassert f() == 1\n")
    assert result.status == "failed"
    assert "SimpleNamespace" in result.reason and "builtin data" in result.reason


def test_assert_caught_by_the_program_still_fails() -> None:
    # Lifted asserts are final: a failing check is never swallowed by the program's try/except.
    result = run("try:\n    assert 1 == 2\nexcept AssertionError:\n    pass\n")
    assert result.status == "failed"


def test_timeout_is_enforced_and_timing_is_sane() -> None:
    start = time.monotonic()
    result = run("import time\ntime.sleep(30)\n", timeout=1.0)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and "1 s" in result.reason
    assert 1.0 <= result.duration <= elapsed < 4.0
    fast = run("import time\ntime.sleep(0.3)\n", timeout=5.0)
    assert fast.passed and 0.3 <= fast.duration < 3.0


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError):
        execute("x = 1", timeout=0)
    with pytest.raises(ValueError):
        execute("x = 1", memory_mb=8)
    with pytest.raises(TypeError):
        execute(b"x = 1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        execute_many([42])  # type: ignore[list-item]


def test_execute_many_keeps_input_order() -> None:
    programs: list[sandbox.ProgramSpec] = [
        ADD + "assert add(1, 2) == 3\n",
        ADD + "assert add(1, 2) == 4\n",
        ("assert helper() == 5\n", "def helper():\n    return 5\n"),
        "raise ValueError('x')\n",
        "import time\ntime.sleep(0.2)\n",
    ]
    seen: list[int] = []
    results = execute_many(programs, workers=2, timeout=T, memory_mb=MEM, on_result=lambda i, r: seen.append(i))
    assert [r.status for r in results] == ["passed", "failed", "passed", "error", "passed"]
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert execute_many([]) == []


def test_execute_many_concurrency_is_bounded() -> None:
    program = "import time\nstart = time.monotonic()\ntime.sleep(0.4)\nprint(start, time.monotonic())\n"
    results = execute_many([program] * 4, workers=2, timeout=T, memory_mb=MEM)
    assert all(r.passed for r in results), [r.reason for r in results]
    spans = [tuple(map(float, r.stdout.split())) for r in results]
    most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert most <= 2
    # More workers than cores are clamped to the cores (a worker per core at most).
    cores = sandbox._available_cores()
    results = execute_many([program] * (cores + 1), workers=cores + 5, timeout=T, memory_mb=MEM)
    spans = [tuple(map(float, r.stdout.split())) for r in results]
    assert max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans) <= cores


@pytest.mark.parametrize("kind", ["unshare", "rlimits"])
def test_fallback_modes_still_decide_safely_and_say_what_they_are(kind: str) -> None:
    iso = sandbox._probe(kind)
    need(iso is not None, f"the {kind} sandbox mode is not available here: {sandbox._DETECT_ERRORS[-1:]}")
    ok = sandbox._execute(ADD + "assert add(1, 2) == 3\n", None, T, MEM, iso)
    assert ok.passed, ok.reason
    assert not ok.isolation.startswith("bwrap")
    assert ok.isolation.startswith("unshare:" if kind == "unshare" else "rlimits-only")
    wrong = sandbox._execute("class E:\n    def __eq__(s, o):\n        return True\nassert E() == 3\n", None, T,
                             MEM, iso)
    assert wrong.status == "failed"
    net = sandbox._execute("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", None, T, MEM, iso)
    assert net.status == "error" and "PermissionError" in net.reason
    early = sandbox._execute("import os\nos._exit(0)\n", None, T, MEM, iso)
    assert early.status == "error"
    loop = sandbox._execute("while True:\n    pass\n", None, 1.0, MEM, iso)
    assert loop.status == "timeout"
