"""Trusted runner that executes one program inside the sandbox; see `tunelab.evaluate.sandbox`.

tunelab never imports this module. `sandbox.py` has it compiled once by the sandbox's interpreter and
runs it in a fresh process (`python -I -S -B -c BOOTSTRAP - JOB_FD CHANNEL_FD ACK_FD`), so it must run
on whatever Python 3.8+ the sandbox uses and may only import the standard library.

Order of work, and why:

1. the bootstrap (`sandbox._BOOTSTRAP`) reads a memfd holding this runner, precompiled by the same
   interpreter, and the job (program, setup, nonce, limits), closes it and runs this module;
2. apply rlimits and a seccomp filter to itself: both are inherited by everything the program starts,
   and neither can be undone by an unprivileged process;
3. send ``ready``: everything in it was measured before any untrusted code ran, so the parent can trust
   it (uid, which limits and filters are in force);
4. compile setup and program (asserts are compiled with ``optimize=0``, so ``-O`` cannot strip them),
   then execute them statement by statement in a fresh ``__main__`` module, sending ``stmt i`` after each
   program statement and ``end`` after the last one, then ``os._exit`` at once (no atexit handlers, no
   waiting for threads).

Asserts that the parent lifted were rewritten into ``__tunelab_check__(id, leaf, ...)`` calls. The hook
serialises each leaf value with a strict type-tagged encoder and waits for the parent's acknowledgement;
the comparison itself, and the expected values, never exist in this process.

Everything here runs in the same process as the untrusted program, so a determined program can reach
this module's state (frames, gc, ctypes). The design does not depend on hiding it: a forged record can
only claim values for checks whose expected values the program never saw, and a forged ``end`` still
needs every mandatory check to have been reported with the right values.
"""

from __future__ import annotations
import __future__

import _ast
import _thread
import builtins
import marshal
import os
import sys
from _json import encode_basestring_ascii as _json_str

# Only C modules and a few tiny ones are imported: interpreter start-up is most of a run's cost, and
# json/linecache/ast/typing/contextlib would pull in `re`, `tokenize` and friends for nothing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Captured before untrusted code runs: the program may rebind builtins (builtins.list = ...) for its own
# reasons, and that must not change how this runner encodes values or reports.
_type = type
_bool, _int, _float, _complex, _str, _bytes, _bytearray = bool, int, float, complex, str, bytes, bytearray
_list, _tuple, _dict, _set, _frozenset, _slice = list, tuple, dict, set, frozenset, slice
_zip = zip
_memoryview = memoryview
_OSError = OSError
_KeyError = KeyError
_RecursionError = RecursionError
_issubclass = issubclass
_len = len
_iter = iter
_next = next
_hex = hex
_repr = repr
_exec = exec
_compile = compile
_getpid = os.getpid
_write = os.write
_read = os.read
_exit = os._exit
_AssertionError = AssertionError
_MemoryError = MemoryError
_SyntaxError = SyntaxError
_SystemExit = SystemExit
_BaseException = BaseException
_type_name = type.__dict__["__name__"].__get__  # a metaclass cannot fake a class name through this
_complex_real = complex.__dict__["real"].__get__
_complex_imag = complex.__dict__["imag"].__get__

_PROGRAM_FILE = "<program>"
_SETUP_FILE = "<setup>"
_MAX_NODES = 1_000_000
_MAX_CHARS = 8 * 1024 * 1024
_MAX_DEPTH = 100

_lock = _thread.allocate_lock()
_nonce = ""
_chan_fd = -1
_ack_fd = -1
_main_pid = -1
_leaf_modes: list[list[str]] = []
_sources: dict[str, list[str]] = {}
_stdout_flush: Any = None
_stderr_flush: Any = None


class _Unencodable(Exception):
    pass


def _json(x: Any) -> str:
    """JSON for the record shapes used here (str, int, bool, None, list, tuple, dict with str keys)."""
    t = _type(x)
    if t is _str:
        return _json_str(x)
    if x is True:
        return "true"
    if x is False:
        return "false"
    if x is None:
        return "null"
    if t is _int:
        return _int.__repr__(x)
    if t is _list or t is _tuple:
        return "[" + ",".join([_json(v) for v in x]) + "]"
    if t is _dict:
        return "{" + ",".join([_json_str(k) + ":" + _json(v) for k, v in _dict.items(x)]) + "}"
    raise TypeError("unexpected record value")


def _send(kind: str, *payload: Any) -> None:
    # A forked copy of the program reaching runner code must stay silent: only the original process
    # reports, so `if os.fork() == 0: ...` cannot run a second, different copy of the tests.
    if _getpid() != _main_pid:
        _exit(0)
    data = (_json([_nonce, _main_pid, kind, *payload]) + "\n").encode("ascii")
    view = _memoryview(data)
    while view:
        n = _write(_chan_fd, view)
        view = view[n:]


def _charge(budget: list[int], chars: int) -> None:
    budget[1] -= chars
    if budget[1] < 0:
        raise _Unencodable(f"value too large to compare (over {_MAX_CHARS} characters encoded)")


def _enc(value: Any, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise _Unencodable(f"value too large to compare (over {_MAX_NODES} elements)")
    if depth > _MAX_DEPTH:
        raise _Unencodable(f"value nested deeper than {_MAX_DEPTH} levels")
    t = _type(value)
    if value is None:
        return ["n"]
    if value is Ellipsis:
        return ["e"]
    if t is _bool:
        return ["b", 1 if value is True else 0]
    # Subclasses are reduced to their builtin base value through the base type's own C methods, so an
    # overridden __eq__/__hash__/__iter__/__str__ of the program's class is never called and never matters.
    if _issubclass(t, _int):
        v = _int.__int__(value)
        _charge(budget, v.bit_length() // 4 + 4)
        return ["i", _hex(v)]
    if _issubclass(t, _float):
        return ["f", _float.hex(_float.__float__(value))]
    if _issubclass(t, _complex):
        return ["c", _float.hex(_complex_real(value)), _float.hex(_complex_imag(value))]
    if _issubclass(t, _str):
        s = _str.__str__(value)
        _charge(budget, _len(s) + 2)
        return ["s", s]
    if _issubclass(t, _bytes):
        h = _bytes.hex(value)
        _charge(budget, _len(h))
        return ["y", h]
    if _issubclass(t, _bytearray):
        h = _bytearray.hex(value)
        _charge(budget, _len(h))
        return ["Y", h]
    if _issubclass(t, _list):
        return ["l", [_enc(x, depth + 1, budget) for x in _list.copy(value)]]
    if _issubclass(t, _tuple):
        return ["t", [_enc(x, depth + 1, budget) for x in _tuple.__getitem__(value, _slice(None))]]
    if _issubclass(t, _dict):
        items = _dict.items(_dict.copy(value))
        return ["d", [[_enc(k, depth + 1, budget), _enc(v, depth + 1, budget)] for k, v in items]]
    if _issubclass(t, _frozenset):
        return ["F", [_enc(x, depth + 1, budget) for x in _frozenset.copy(value)]]
    if _issubclass(t, _set):
        return ["S", [_enc(x, depth + 1, budget) for x in _set.copy(value)]]
    raise _Unencodable("an object of type " + _safe_type_name(t))


def _safe_type_name(t: Any) -> str:
    try:
        name = _type_name(t)
        return name if _type(name) is _str else "?"
    except _BaseException:
        return "?"


_BUILTIN_CONTAINERS = (_list, _tuple, _dict, _set, _frozenset, _str, _bytes, _bytearray)


def _encode_leaf(value: Any, mode: str) -> list[Any]:
    try:
        return ["ok", _enc(value, 0, [_MAX_NODES, _MAX_CHARS])]
    except _Unencodable as exc:
        reason = exc.args[0]
    except _RecursionError:
        reason = "value nested too deeply"
    builtin = False
    for c in _BUILTIN_CONTAINERS:
        builtin = builtin or _issubclass(_type(value), c)
    if mode == "it" and not builtin:
        # The assert consumes the value by iteration (list(x), sorted(x), set(x)...), so iterating it here
        # is what Python would do; exceptions from the program's __iter__ propagate like in Python.
        items = []
        budget = [_MAX_NODES, _MAX_CHARS]
        for item in _iter(value):
            try:
                items.append(_enc(item, 1, budget))
            except _Unencodable as exc:
                return ["x", "an item: " + exc.args[0]]
            except _RecursionError:
                return ["x", "an item nested too deeply"]
        return ["it", items]
    if mode == "len" and not builtin:
        return ["ln", _hex(_len(value))]
    return ["x", reason]


def __tunelab_check__(cid: int, *leaves: Any) -> None:
    modes = _leaf_modes[cid] if _type(cid) is _int and 0 <= cid < _len(_leaf_modes) else None
    if modes is None or _len(modes) != _len(leaves):
        _send("bad", "check hook called with a wrong signature")
        _exit(3)
    encoded = [_encode_leaf(v, m) for v, m in _zip(leaves, modes)]
    # A failing check ends the run at once, so what the program printed so far must be out first.
    _flush()
    with _lock:
        _send("check", cid, encoded)
        ack = _read(_ack_fd, 1)
    if ack != b"k":
        _exit(3)


class _Quitter:
    """`exit`/`quit` without the site module (started with -S); they raise SystemExit like Python's."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Use {self.name}() to exit"

    def __call__(self, code: Any = None) -> None:
        raise _SystemExit(code)


def _plain(x: Any) -> str:
    if _type(x) in (_str, _int, _float, _bool, _complex) or x is None:
        return _repr(x)
    return "<" + _safe_type_name(_type(x)) + " object>"


def _safe_message(exc: BaseException) -> str:
    # str(exc) could run the program's own __str__; render only builtin arguments.
    try:
        args = _BaseException.__dict__["args"].__get__(exc)
    except _BaseException:
        return ""
    if _type(args) is not _tuple:
        return ""
    t = _type(exc)
    if _issubclass(t, _OSError) and _len(args) >= 2 and _type(args[0]) is _int and _type(args[1]) is _str:
        text = "[Errno " + _repr(args[0]) + "] " + args[1]
        filename = _OSError.__dict__["filename"].__get__(exc)
        if _type(filename) is _str:
            text += ": " + _repr(filename)
    elif _len(args) == 1 and _type(args[0]) is _str and not _issubclass(t, _KeyError):
        text = args[0]
    elif _len(args) == 1:
        text = _plain(args[0])
    else:
        text = ", ".join(_plain(a) for a in args[:8])
    return text[:2000]


def _frames(exc: BaseException) -> list[list[Any]]:
    """(file, line, function) of each traceback frame that belongs to the program or the setup."""
    out = []
    tb = exc.__traceback__
    steps = 0
    while tb is not None and steps < 10000:
        steps += 1
        code = tb.tb_frame.f_code
        filename = code.co_filename
        if _type(filename) is _str and filename in (_PROGRAM_FILE, _SETUP_FILE):
            name = code.co_name if _type(code.co_name) is _str else "?"
            out.append([filename, tb.tb_lineno, name])
        tb = tb.tb_next
    if _len(out) > 40:
        out = out[:20] + out[-20:]
    return out


def _flush() -> None:
    for flush in (_stdout_flush, _stderr_flush):
        try:
            if flush is not None:
                flush()
        except _BaseException:
            pass


def _syntax_details(exc: BaseException, info: dict[str, Any]) -> None:
    for key, attr in (("lineno", "lineno"), ("filename", "filename"), ("message", "msg")):
        try:
            value = _SyntaxError.__dict__[attr].__get__(exc)
        except _BaseException:
            continue
        if key == "lineno" and _type(value) is _int or key != "lineno" and _type(value) is _str:
            info[key] = value


def _fail(stage: str, index: int, exc: BaseException) -> None:
    """Report an exception that ended the program, print a traceback to stderr, and exit."""
    try:
        _flush()
        t = _type(exc)
        name = _safe_type_name(t)
        message = _safe_message(exc)
        frames = _frames(exc)
        info: dict[str, Any] = {
            "stage": stage,
            "stmt": index,
            "type": name,
            "message": message,
            "frames": frames,
            "assertion": _issubclass(t, _AssertionError),
            "memory": _issubclass(t, _MemoryError),
            "exit": _issubclass(t, _SystemExit),
        }
        if _issubclass(t, _SyntaxError):
            _syntax_details(exc, info)
        lines = ["Traceback (most recent call last):"]
        for filename, lineno, func in frames:
            lines.append(f'  File "{filename}", line {lineno}, in {func}')
            lines_of = _sources.get(filename) or []
            src = lines_of[lineno - 1].strip() if 0 < lineno <= _len(lines_of) else ""
            if src:
                lines.append("    " + src[:300])
        lines.append(f"{name}: {message}" if message else name)
        try:  # noqa: SIM105 - contextlib costs start-up time
            _write(2, ("\n".join(lines) + "\n").encode("utf-8", "replace"))
        except _BaseException:
            pass
        _send("error", info)
    finally:
        _exit(1)


def _count_own_tasks(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as fh:
                for line in fh:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            count += _len(os.listdir(f"/proc/{entry}/task"))
                        break
        except (OSError, ValueError, IndexError):
            continue
    return count


def _apply_limits(limits: dict[str, Any]) -> list[str]:
    import resource

    applied = []

    def setlim(name: str, res: int, soft: int, hard: int) -> None:
        try:
            resource.setrlimit(res, (soft, hard))
            applied.append(name)
        except (ValueError, OSError):
            pass

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(usage.ru_utime + usage.ru_stime) + int(limits["cpu_s"])
    # Soft limit first sends SIGXCPU, the hard one a second later SIGKILL, so a program ignoring
    # SIGXCPU still dies.
    setlim("cpu", resource.RLIMIT_CPU, cpu, cpu + 1)
    setlim("as", resource.RLIMIT_AS, int(limits["as_bytes"]), int(limits["as_bytes"]))
    setlim("fsize", resource.RLIMIT_FSIZE, int(limits["fsize_bytes"]), int(limits["fsize_bytes"]))
    setlim("nofile", resource.RLIMIT_NOFILE, int(limits["nofile"]), int(limits["nofile"]))
    setlim("core", resource.RLIMIT_CORE, 0, 0)
    nproc = int(limits["nproc"])
    if limits.get("nproc_relative"):
        # Same uid as other processes on the host: the limit counts all of them, so leave headroom.
        nproc += _count_own_tasks(os.getuid())
    setlim("nproc", resource.RLIMIT_NPROC, nproc, nproc)
    return applied


# seccomp-BPF, built by hand so no library is needed inside the sandbox.
_ARCH = {
    # machine: (AUDIT_ARCH, syscall numbers)
    "x86_64": (0xC000003E, {
        "execve": 59, "execveat": 322, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
        "setsid": 112, "setpgid": 109, "unshare": 272, "setns": 308, "mount": 165, "umount2": 166,
        "pivot_root": 155, "chroot": 161, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
        "keyctl": 250, "add_key": 248, "request_key": 249, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "clone": 56, "clone3": 435, "socket": 41, "kill": 62, "tkill": 200,
        "tgkill": 234, "fork": 57, "vfork": 58,
    }),
    "aarch64": (0xC00000B7, {
        "execve": 221, "execveat": 281, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
        "setsid": 157, "setpgid": 154, "unshare": 97, "setns": 268, "mount": 40, "umount2": 39,
        "pivot_root": 41, "chroot": 51, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
        "keyctl": 219, "add_key": 217, "request_key": 218, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "clone": 220, "clone3": 435, "socket": 198, "kill": 129, "tkill": 130,
        "tgkill": 131,
    }),
}
_DENIED = ("execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "setsid", "setpgid",
           "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "bpf", "perf_event_open",
           "userfaultfd", "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter",
           "io_uring_register")
_CLONE_NS_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_CLONE_THREAD = 0x00010000
_AF_UNIX = 1
_EPERM = 1
_ENOSYS = 38


def _seccomp_program(machine: str, guard_kill: bool, own_pid: int,
                     deny_fork: bool = False) -> list[tuple[int, int, int, int]]:
    arch, nr = _ARCH[machine]
    ld_w_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, deny, enosys = 0x7FFF0000, 0x00050000 | _EPERM, 0x00050000 | _ENOSYS
    # Instructions with symbolic jump targets, resolved below (BPF jumps are relative and forward only).
    prog: list[tuple[Any, ...]] = [
        ("I", ld_w_abs, 4),                        # seccomp_data.arch
        ("J", jeq, arch, None, "deny"),            # another ABI (e.g. int 0x80 on x86_64): refuse all
        ("I", ld_w_abs, 0),                        # seccomp_data.nr
    ]
    if machine == "x86_64":
        prog.append(("J", jge, 0x40000000, "deny", None))  # x32 syscalls
    for name in _DENIED:
        prog.append(("J", jeq, nr[name], "deny", None))
    if deny_fork:
        for name in ("fork", "vfork"):
            if name in nr:
                prog.append(("J", jeq, nr[name], "deny", None))
    prog.append(("J", jeq, nr["clone3"], "enosys", None))  # its flags sit in memory; glibc falls back to clone
    prog.append(("J", jeq, nr["clone"], "clone", None))
    prog.append(("J", jeq, nr["socket"], "socket", None))
    if guard_kill:
        for name in ("kill", "tkill", "tgkill"):
            prog.append(("J", jeq, nr[name], "kill", None))
    prog.append(("R", allow))
    prog += [("L", "clone"), ("I", ld_w_abs, 16), ("J", jset, _CLONE_NS_FLAGS, "deny", None)]
    if deny_fork:
        # Threads only (CLONE_THREAD): where the kernel will not enforce RLIMIT_NPROC, no new processes.
        prog.append(("J", jset, _CLONE_THREAD, "allow", "deny"))
    else:
        prog.append(("R", allow))
    prog += [("L", "socket"), ("I", ld_w_abs, 16), ("J", jeq, _AF_UNIX, None, "deny"), ("R", allow)]
    if guard_kill:
        # Without a pid namespace, only signals to itself (and its own group, pid 0) are allowed.
        prog += [("L", "kill"), ("I", ld_w_abs, 16), ("J", jeq, 0, "allow", None),
                 ("J", jeq, own_pid, "allow", "deny")]
    prog += [("L", "allow"), ("R", allow), ("L", "deny"), ("R", deny), ("L", "enosys"), ("R", enosys)]

    labels: dict[str, int] = {}
    pos = 0
    for ins in prog:
        if ins[0] == "L":
            labels[ins[1]] = pos
        else:
            pos += 1
    out: list[tuple[int, int, int, int]] = []
    for ins in prog:
        here = _len(out)
        if ins[0] == "I":
            out.append((ins[1], 0, 0, ins[2]))
        elif ins[0] == "R":
            out.append((ret, 0, 0, ins[1]))
        elif ins[0] == "J":
            jt = 0 if ins[3] is None else labels[ins[3]] - here - 1
            jf = 0 if ins[4] is None else labels[ins[4]] - here - 1
            if not (0 <= jt < 256 and 0 <= jf < 256):
                raise ValueError("seccomp jump out of range")
            out.append((ins[1], jt, jf, ins[2]))
    return out


def _install_seccomp(options: dict[str, Any]) -> str:
    """Install the filter on this (single-threaded) process; return a short description or ''."""
    machine = os.uname().machine
    if machine not in _ARCH or sys.byteorder != "little":
        return ""
    try:
        import ctypes
    except ImportError:
        return ""
    guard_kill = bool(options.get("guard_kill"))
    deny_fork = bool(options.get("deny_fork"))
    insns = _seccomp_program(machine, guard_kill, _getpid(), deny_fork)

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    arr = (SockFilter * _len(insns))(*[SockFilter(*i) for i in insns])
    fprog = SockFprog(_len(insns), ctypes.cast(arr, ctypes.POINTER(SockFilter)))
    libc = ctypes.CDLL(None, use_errno=True)
    ul = ctypes.c_ulong
    # Die with the evaluator even where no pid namespace does it for us (rlimits-only fallback).
    libc.prctl(1, ul(9), ul(0), ul(0), ul(0))  # PR_SET_PDEATHSIG, SIGKILL
    if libc.prctl(38, ul(1), ul(0), ul(0), ul(0)) != 0:  # PR_SET_NO_NEW_PRIVS
        return ""
    if libc.prctl(22, ul(2), ctypes.cast(ctypes.pointer(fprog), ctypes.c_void_p), ul(0), ul(0)) != 0:
        return ""  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    parts = ["exec", "inet-sockets", "namespaces", "ptrace", "setsid", "mount", "io_uring", "bpf"]
    if guard_kill:
        parts.append("kill-others")
    if deny_fork:
        parts.append("fork")
    return ",".join(parts)


def _compile_units(source: str, filename: str) -> list[Any]:
    """Compile each top-level statement separately, after checking the whole module compiles."""
    _compile(source, filename, "exec", dont_inherit=True, optimize=0)
    tree = _compile(source, filename, "exec", _ast.PyCF_ONLY_AST, dont_inherit=True, optimize=0)
    flags = 0
    codes = []
    for stmt in tree.body:
        if isinstance(stmt, _ast.ImportFrom) and stmt.module == "__future__":
            for alias in stmt.names:
                feature = getattr(__future__, alias.name, None)
                if feature is not None:
                    flags |= feature.compiler_flag
        module = _ast.Module(body=[stmt], type_ignores=[])
        codes.append(_compile(module, filename, "exec", flags=flags, dont_inherit=True, optimize=0))
    return codes


def _register_source(filename: str, source: str) -> None:
    _sources[filename] = source.split("\n")


def main(argv: list[str]) -> None:
    global _nonce, _chan_fd, _ack_fd, _main_pid, _leaf_modes, _stdout_flush, _stderr_flush

    _, chan_fd, ack_fd = (int(a) for a in argv[-3:])
    _main_pid = _getpid()
    _chan_fd, _ack_fd = chan_fd, ack_fd
    # The bootstrap read the job memfd (and closed it) and left the job bytes in this global.
    job = marshal.loads(globals().pop("_JOB"))
    _nonce = job["nonce"]
    _leaf_modes = job["leaf_modes"]
    limits = _apply_limits(job["limits"])
    seccomp = _install_seccomp(job["seccomp"])
    _stdout_flush = sys.stdout.flush if sys.stdout is not None else None
    _stderr_flush = sys.stderr.flush if sys.stderr is not None else None
    _send("ready", {"uid": os.getuid(), "gid": os.getgid(), "rlimits": limits, "seccomp": seccomp,
                    "python": ".".join(str(v) for v in sys.version_info[:3]), "optimize": sys.flags.optimize})

    sys.argv = [_PROGRAM_FILE]
    setup = job.get("setup")
    program = job["program"]
    _register_source(_PROGRAM_FILE, program)
    try:
        setup_codes = _compile_units(setup, _SETUP_FILE) if setup else []
    except _BaseException as exc:
        _fail("setup-compile", -1, exc)
    if setup:
        _register_source(_SETUP_FILE, setup)
    try:
        program_codes = _compile_units(program, _PROGRAM_FILE)
    except _BaseException as exc:
        _fail("compile", -1, exc)

    module = _type(sys)("__main__")
    namespace = module.__dict__
    namespace["__builtins__"] = builtins
    namespace["__tunelab_check__"] = __tunelab_check__
    builtins.exit = _Quitter("exit")
    builtins.quit = _Quitter("quit")
    # `import __main__` (pickle, doctest) must find the program, not this runner.
    sys.modules["__main__"] = module

    for i, code in enumerate(setup_codes):
        try:
            _exec(code, namespace)
        except _BaseException as exc:
            _fail("setup", i, exc)
    for i, code in enumerate(program_codes):
        try:
            _exec(code, namespace)
        except _BaseException as exc:
            _fail("program", i, exc)
        _send("stmt", i)
    _flush()
    _send("end", _len(program_codes))
    _exit(0)


if __name__ == "__main__":
    try:
        main(sys.argv)
    finally:
        # Reached only if the runner itself broke (or the program raised into it from a signal handler):
        # never let the interpreter shut down normally and run the program's atexit handlers.
        _exit(4)
