"""A battery of malformed inputs, each through the real CLI: exit 2, one `error:` line naming the file (and line
where there is one), no traceback, no run directory left behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

TUNELAB = str(Path(sys.executable).parent / "tunelab")
TINY = str(REPO / "configs" / "tiny" / "sft_lora.yaml")
BINARY = b"\xff\xfe" + bytes(range(256)) * 4  # not UTF-8 from the first byte on


def _files(d: Path) -> dict[str, Path]:
    files = {
        "bin.jsonl": BINARY, "latin1.jsonl": '{"text": "café"}\n'.encode("latin-1"),
        "trunc.json": b'{"messages": [', "bad.parquet": BINARY[:300], "bin.yaml": BINARY,
        "bad.jsonl": b'{"text": "ok"}\n{"text": \n', "list.jsonl": b'[1, 2]\n', "nokeys.csv": b"a,b\n1,2\n",
        "tab.yaml": b"model:\n\tname: x\n",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: d / name for name in files}


CASES = [  # (argv built from the files, what the one line must contain)
    (lambda f: ["train", TINY, "data.train=<bin.jsonl>"], "bin.jsonl:1: not UTF-8"),
    (lambda f: ["train", TINY, "data.train=<latin1.jsonl>"], "latin1.jsonl:1: not UTF-8"),
    (lambda f: ["train", TINY, "data.train=<trunc.json>"], "trunc.json:1: malformed JSON"),
    (lambda f: ["train", TINY, "data.train=<bad.parquet>"], "bad.parquet: not a readable Parquet file"),
    (lambda f: ["train", TINY, "data.train=<bad.jsonl>"], "bad.jsonl:2: malformed JSON"),
    (lambda f: ["train", TINY, "data.train=<list.jsonl>"], "list.jsonl:1: each line must be a JSON object"),
    (lambda f: ["train", TINY, "data.train=<nokeys.csv>"], "nokeys.csv:2: cannot tell the data format"),
    (lambda f: ["train", "<bin.yaml>"], "bin.yaml:1: not UTF-8"),
    (lambda f: ["train", "<tab.yaml>"], "tab.yaml:2: invalid YAML"),
    (lambda f: ["compare", "<bin.yaml>"], "bin.yaml:1: not UTF-8"),
    (lambda f: ["eval", "tiny-llama", "--task", "mbpp", "--data", "<bin.jsonl>", "--limit", "1"], "bin.jsonl:1: not UTF-8"),
    (lambda f: ["train", TINY, "data.train=<missing.jsonl>"], "data file not found"),
]


@pytest.mark.parametrize(("argv", "needle"), CASES, ids=[c[1].split(":")[0].split(" ")[0] + f"-{i}" for i, c in enumerate(CASES)])
def test_malformed_input_is_one_line_exit_2(argv, needle: str, tmp_path: Path) -> None:  # noqa: ANN001
    files = {k: str(v) for k, v in _files(tmp_path).items()} | {"missing.jsonl": str(tmp_path / "missing.jsonl")}
    args = [re.sub(r"<([^>]+)>", lambda m: files[m.group(1)], a) for a in argv(files)]
    if args[0] == "train":
        args += ["--out", str(tmp_path / "run"), "--quiet"]
    p = subprocess.run([TUNELAB, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert lines and lines[-1].startswith("error: ") and needle in lines[-1], lines[-1:]
    assert not (tmp_path / "run").exists()  # a refused run leaves nothing behind


@pytest.mark.parametrize(("argv", "needle"), [
    (["train", TINY, "-q"], "No such option: -q"),
    (["trian"], "No such command 'trian'"),
])
def test_usage_mistake_is_exit_2_without_traceback(argv: list[str], needle: str, tmp_path: Path) -> None:
    # typer >= 0.20 raises its vendored click's exceptions, which once escaped as a raw traceback
    p = subprocess.run([TUNELAB, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and needle in p.stderr, p.stderr[-2000:]
