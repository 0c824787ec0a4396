"""Hostile programs: each must end with exactly the expected status, never pass, and leave the host alone.

Every case runs against a host "canary" directory (a file to delete, a place to write) that the program
names by its real path, a TCP listener on 127.0.0.1 that must never see a connection, and a fake secret
in the evaluator's environment that must never show up in the program's output. These checks run after
every case, on top of the case's own expectation.

The expectations are those of the full isolation (bubblewrap + seccomp), which CI installs; elsewhere
the module is skipped (test_sandbox.py covers the fallbacks).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import need

from tunelab.evaluate import sandbox
from tunelab.evaluate.sandbox import ExecutionResult, execute


@pytest.fixture(autouse=True)
def _bubblewrap() -> None:
    need(sandbox.isolation_summary().startswith("bwrap"), "needs bubblewrap with user namespaces (apt-get install bubblewrap)")


SECRET = "tl-fake-secret-7f3a9c"
WRONG = "def add(a, b):\n    return a * b\n"  # wrong for the asserts below: add(1, 2) == 2
MARK = "tlorph"


@dataclass(frozen=True)
class Case:
    name: str
    program: str
    status: str
    timeout: float = 2.0
    memory_mb: int = 256
    extra: Callable[[ExecutionResult, Path], None] | None = None


def _no_marked_process(result: ExecutionResult, canary: Path) -> None:
    # The sandbox has already killed the tree when execute() returns; allow the kernel a moment to reap.
    deadline = time.monotonic() + 1.0
    while True:
        alive = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if comm.startswith(MARK) and state != "Z":
                alive.append(entry)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not alive, f"processes of the sandbox survived: {alive}"


def _secret_not_leaked(result: ExecutionResult, canary: Path) -> None:
    assert SECRET not in result.stdout and SECRET not in result.stderr
    assert "environ" in result.stdout  # the program did run and print what it could see


def _reason_has(*words: str) -> Callable[[ExecutionResult, Path], None]:
    def check(result: ExecutionResult, canary: Path) -> None:
        for word in words:
            assert word in result.reason, result.reason
    return check


CASES = [
    # --- resource exhaustion -------------------------------------------------------------------
    Case("infinite_loop", "while True:\n    pass\n", "timeout", timeout=1.0),
    Case("sleep_forever", "import time\ntime.sleep(10**6)\n", "timeout", timeout=1.0),
    Case("fork_bomb", "import os\nwhile True:\n    os.fork()\n", "error", extra=_reason_has("BlockingIOError")),
    Case("fork_bomb_that_swallows_errors",
         "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", "timeout", timeout=1.0),
    Case("memory_bomb_bytearray", "x = bytearray(1024 ** 3)\n", "memory_limit"),
    Case("memory_bomb_growing_list", "keep = []\nwhile True:\n    keep.append(' ' * 10**6 + str(len(keep)))\n",
         "memory_limit"),
    Case("memory_fork_bomb",  # each child stays under RLIMIT_AS; together they would not
         "import os, time\nfor _ in range(30):\n    if os.fork() == 0:\n        x = b'x' * (150 * 2**20)\n"
         "        time.sleep(30)\ntime.sleep(30)\n", "memory_limit", timeout=5.0,
         extra=_reason_has("together")),
    Case("huge_stdout", WRONG + "import sys\nfor _ in range(10**6):\n    sys.stdout.write('x' * 65536)\n"
         "assert add(1, 2) == 3\n", "output_limit"),
    Case("huge_stderr", "import sys\nwhile True:\n    print('y' * 1000, file=sys.stderr)\n", "output_limit"),
    Case("recursion_bomb", "def f(n):\n    return f(n + 1)\nf(0)\n", "error", extra=_reason_has("RecursionError")),
    Case("c_stack_overflow", "import sys\nsys.setrecursionlimit(10**8)\nx = []\nfor _ in range(300000):\n"
         "    x = [x]\nrepr(x)\n", "killed", timeout=5.0, extra=_reason_has("SIGSEGV")),
    Case("fill_the_tmpfs", "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * 2**20)\n    i += 1\n", "error",
         extra=_reason_has("No space left")),
    Case("file_over_size_limit", "open('big', 'wb').write(b'x' * (40 * 2**20))\n", "error",
         extra=_reason_has("File too large")),
    # --- escaping the sandbox ------------------------------------------------------------------
    Case("write_outside_tmp", "open('@CANARY@/pwned', 'w').write('x')\n", "error"),
    Case("write_outside_tmp_io_open", "import io\nio.open('@CANARY@/pwned', 'w').write('x')\n", "error"),
    Case("delete_host_file", "import posix\nposix.unlink('@CANARY@/victim.txt')\n", "error"),
    Case("read_root_home", "import os\nprint(os.listdir('/root'))\n", "error"),
    Case("read_the_repository", "print(open('@REPO@/pyproject.toml').read())\n", "error"),
    Case("list_work", "import os\nprint(os.listdir('/work'))\n", "error"),
    Case("env_and_proc_secrets", "import os\nprint('environ', dict(os.environ))\n"
         "for pid in os.listdir('/proc'):\n    try:\n        print(open(f'/proc/{pid}/environ').read())\n"
         "    except OSError:\n        pass\n"
         "assert os.environ.get('TUNELAB_FAKE_SECRET') == '@SECRET@'\n", "failed", extra=_secret_not_leaked),
    Case("network_connect_loopback", "import socket\ns = socket.create_connection(('127.0.0.1', @PORT@), 1)\n"
         "s.sendall(b'exfil')\n", "error", extra=_reason_has("PermissionError")),
    Case("network_raw_syscall_via_ctypes", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
         "fd = libc.socket(2, 1, 0)\nassert fd >= 0, ctypes.get_errno()\n", "failed"),
    Case("subprocess_spawn", "import subprocess\nsubprocess.run(['touch', '@CANARY@/pwned'])\n", "error"),
    Case("os_system", WRONG + "import os\nrc = os.system('touch @CANARY@/pwned')\nassert rc == 0\n", "failed"),
    Case("posix_spawn", "import os\nos.posix_spawn('/usr/bin/touch', ['touch', '@CANARY@/pwned'], {})\n", "error"),
    Case("ctypes_libc_system", WRONG + "import ctypes\nctypes.CDLL(None).system(b'touch @CANARY@/pwned')\n"
         "assert add(1, 2) == 3\n", "failed"),
    Case("daemon_thread_writes_later", WRONG + "import threading, time\ndef late():\n    time.sleep(0.3)\n"
         "    open('@CANARY@/pwned', 'w').write('late')\nthreading.Thread(target=late, daemon=True).start()\n"
         "time.sleep(0.6)\nassert add(1, 2) == 3\n", "failed"),
    Case("orphan_grandchild_sleeps", WRONG + "import os, time\nif os.fork() == 0:\n    try:\n        os.setsid()\n"
         "    except OSError:\n        pass\n    if os.fork() == 0:\n"
         "        open('/proc/self/comm', 'w').write('@MARK@')\n        time.sleep(60)\n    os._exit(0)\n"
         "time.sleep(0.3)\nassert add(1, 2) == 3\n", "failed", extra=_no_marked_process),
    Case("stdin_read", "x = input()\n", "error", extra=_reason_has("EOFError")),
    Case("setsid_escape", "import os\nos.setsid()\n", "error"),
    # --- faking a pass -------------------------------------------------------------------------
    Case("exit_0", WRONG + "exit(0)\nassert add(1, 2) == 3\n", "error", extra=_reason_has("SystemExit")),
    Case("sys_exit_0", WRONG + "import sys\nsys.exit(0)\nassert add(1, 2) == 3\n", "error"),
    Case("os__exit_0", WRONG + "import os\nos._exit(0)\nassert add(1, 2) == 3\n", "error",
         extra=_reason_has("exited (status 0)")),
    Case("raise_SystemExit", WRONG + "raise SystemExit\nassert add(1, 2) == 3\n", "error"),
    Case("raise_KeyboardInterrupt", WRONG + "raise KeyboardInterrupt\nassert add(1, 2) == 3\n", "error"),
    Case("raise_BaseException_subclass", WRONG + "class Out(BaseException):\n    pass\nraise Out()\n", "error"),
    Case("atexit_os__exit_0", WRONG + "import atexit, os\natexit.register(lambda: os._exit(0))\n"
         "assert add(1, 2) == 3\n", "failed"),
    Case("print_success_markers", WRONG + "print('PASSED')\nprint('{\"passed\": true}')\n"
         "assert add(1, 2) == 3\n", "failed"),
    Case("patch_builtins_abs", WRONG + "import builtins\nbuiltins.abs = lambda x: 0\n"
         "assert abs(add(1, 2) - 3) < 1e-9\n", "failed"),
    Case("replace_AssertionError", WRONG + "import builtins\nclass Never(Exception):\n    pass\n"
         "builtins.AssertionError = Never\nassert add(1, 2) == 3\n", "failed"),
    Case("patch_print_and_len", WRONG + "import builtins\nbuiltins.print = lambda *a, **k: None\n"
         "builtins.len = lambda x: 3\nassert len(str(add(1, 2))) == 3\n", "failed"),
    Case("eq_always_true", "class E:\n    def __eq__(self, other):\n        return True\n"
         "    def __ne__(self, other):\n        return False\ndef add(a, b):\n    return E()\n"
         "assert add(1, 2) == 3\n", "failed", extra=_reason_has("builtin data")),
    Case("int_subclass_eq_always_true", "class I(int):\n    def __eq__(self, other):\n        return True\n"
         "    __hash__ = int.__hash__\ndef add(a, b):\n    return I(a * b)\nassert add(1, 2) == 3\n", "failed"),
    Case("reexec_under_O", WRONG + "import os, sys\nos.execv(sys.executable, [sys.executable, '-O', '-c', 'pass'])\n"
         "assert add(1, 2) == 3\n", "error", extra=_reason_has("PermissionError")),
    Case("kill_parent", WRONG + "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nassert add(1, 2) == 3\n",
         "failed"),
    Case("kill_everything", WRONG + "import os, signal\nos.kill(-1, signal.SIGKILL)\nassert add(1, 2) == 3\n", "error"),
    Case("kill_self", WRONG + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\nassert add(1, 2) == 3\n",
         "killed"),
    Case("sigalrm_handler_swallows", "import signal\nsignal.signal(signal.SIGALRM, lambda *a: None)\n"
         "signal.alarm(1)\nwhile True:\n    pass\n", "timeout", timeout=1.0),
    Case("sigterm_ignored_infinite_loop", "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
         "while True:\n    pass\n", "timeout", timeout=1.0),
    Case("all_signals_blocked", "import signal\nsignal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))\n"
         "while True:\n    pass\n", "timeout", timeout=1.0),
    Case("ctypes_segfault", "import ctypes\nctypes.string_at(0)\n", "killed"),
    Case("ctypes_rewrites_expected_literal",  # would fool an in-process `==`: the literal 200 now reads 201
         "import ctypes\ndef add(a, b):\n    return 201\nctypes.c_uint32.from_address(id(200) + 24).value = 201\n"
         "assert add(100, 100) == 200\n", "failed"),
    Case("replace_the_check_hook", WRONG + "__tunelab_check__ = lambda *a: None\nassert add(1, 2) == 3\n", "failed",
         extra=_reason_has("never ran")),
    Case("rebind_check_function", WRONG + "import threading, time\n"
         "def swap():\n    while 'check' not in globals():\n        time.sleep(0.001)\n"
         "    globals()['check'] = lambda c: None\nthreading.Thread(target=swap, daemon=True).start()\n"
         "def check(candidate):\n    assert candidate(1, 2) == 3\ntime.sleep(0.2)\ncheck(add)\n", "failed"),
    Case("forge_end_record_via_frames", WRONG + "import sys\ndef forge():\n    f = sys._getframe(1).f_back\n"
         "    g, loc = f.f_globals, f.f_locals\n    n = len(loc['program_codes'])\n"
         "    for k in range(loc['i'], n):\n        g['_send']('stmt', k)\n    g['_send']('end', n)\n"
         "    g['_exit'](0)\nforge()\nassert add(1, 2) == 3\n", "failed", extra=_reason_has("never ran")),
    Case("garbage_on_every_fd", "import os\nfor fd in range(3, 20):\n    try:\n"
         "        os.write(fd, b'[\"x\", 1, \"end\", 0]\\n')\n    except OSError:\n        pass\n", "error",
         extra=_reason_has("tampered")),
    Case("forked_child_runs_the_tests", WRONG + "import os\nos.fork()\nassert add(1, 2) == 3\n", "failed"),
    Case("close_every_fd", "def add(a, b):\n    return a + b\nimport os\nos.closerange(3, 256)\n"
         "assert add(1, 2) == 3\n", "error"),
]


@pytest.fixture(scope="module")
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP server on the host loopback; it records every connection it gets."""
    received: list[bytes] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    received.append(b"<connection>" + conn.recv(1024))
                except OSError:
                    received.append(b"<connection>")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], received
    stop.set()
    thread.join(2)
    server.close()


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_program(case: Case, tmp_path: Path, listener: tuple[int, list[bytes]],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    port, received = listener
    monkeypatch.setenv("TUNELAB_FAKE_SECRET", SECRET)
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "victim.txt").write_text("precious")
    repo = Path(__file__).resolve().parents[2]
    program = (case.program.replace("@CANARY@", str(canary)).replace("@PORT@", str(port))
               .replace("@SECRET@", SECRET).replace("@REPO@", str(repo)).replace("@MARK@", MARK))

    result = execute(program, timeout=case.timeout, memory_mb=case.memory_mb)

    assert not result.passed
    assert result.status == case.status, f"{result.status}: {result.reason}"
    assert result.reason
    # The host is untouched: nothing written, nothing deleted, no connection, no leaked secret.
    time.sleep(0.05)
    assert sorted(p.name for p in canary.iterdir()) == ["victim.txt"]
    assert (canary / "victim.txt").read_text() == "precious"
    assert received == []
    assert SECRET not in result.stdout + result.stderr
    assert len(result.stdout) <= sandbox.OUTPUT_LIMIT and len(result.stderr) <= sandbox.OUTPUT_LIMIT
    assert result.duration < case.timeout + 5
    if case.extra is not None:
        case.extra(result, canary)


def test_late_side_effects_never_reach_the_host(tmp_path: Path) -> None:
    """A correct program that leaves a thread and a grandchild behind passes, and nothing survives it."""
    target = tmp_path / "late.txt"
    program = ("import os, threading, time\ndef add(a, b):\n    return a + b\n"
               f"def late():\n    time.sleep(0.5)\n    open({str(target)!r}, 'w').write('x')\n"
               "threading.Thread(target=late).start()\n"
               f"if os.fork() == 0:\n    open('/proc/self/comm', 'w').write('{MARK}')\n    late()\n    os._exit(0)\n"
               "assert add(1, 2) == 3\n")
    result = execute(program, timeout=3, memory_mb=256)
    assert result.passed, result.reason
    assert result.duration < 0.5 + 1.0  # the verdict did not wait for the non-daemon thread
    _no_marked_process(result, tmp_path)
    time.sleep(0.8)
    assert not target.exists()


def test_hard_coded_answers_are_not_detected() -> None:
    """Documented limit: visible tests can be answered by hard-coding, and that passes."""
    program = "def add(a, b):\n    return {(1, 2): 3, (2, 2): 4}[(a, b)]\nassert add(1, 2) == 3\nassert add(2, 2) == 4\n"
    assert execute(program, timeout=3, memory_mb=256).passed
