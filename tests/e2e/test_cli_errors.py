"""User mistakes at every CLI verb, table-driven: exit 2, one message naming what to do, no traceback, nothing
started. (Malformed data and config files: test_malformed_inputs.py; mistakes against an existing run:
test_cli_train.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

TUNELAB = str(Path(sys.executable).parent / "tunelab")
TINY = str(REPO / "configs" / "tiny" / "sft_lora.yaml")

CASES = [  # (argv, what stderr must contain)
    (["list", "nonsense"], "error: cannot list 'nonsense': choose methods, objectives, tasks or models"),
    (["eval"], "error: eval: give exactly one model"),
    (["eval", "tiny-llama", "tiny-gpt2", "--task", "humaneval"], "unexpected extra argument"),
    (["eval", "<tmp>/no_run", "--task", "humaneval"], "error: model.name: path not found"),
    (["eval", "tiny-llama", "--task", "nope"], "error: --task.name: unknown eval task 'nope' (known: "),
    (["export", "<tmp>/no_run"], "no finished run here"),
    (["train", "method.r=4"], "error: data.train is not set"),  # overrides without a config
    (["train", TINY, "--out", "<tmp>", "--quiet"], "exists and is not a tunelab run dir; choose another --out or pass --overwrite"),
    (["config", "<tmp>/missing.yaml"], "error: config file not found"),
    (["compare", "<tmp>/missing.yaml"], "error: config file not found"),
    (["search", "<tmp>/missing.yaml"], "error: config file not found"),
    (["quickstart", "--steps", "0"], "Invalid value for '--steps'"),  # 0 once meant "a whole epoch", silently
    (["data", "build-pairs"], "Missing argument"),
    (["train", TINY, "method.name=nope"], "error: method.name: unknown method 'nope' (known: "),
]


@pytest.mark.parametrize(("argv", "needle"), CASES, ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(CASES)])
def test_user_mistake_is_exit_2_with_one_message(argv: list[str], needle: str, tmp_path: Path) -> None:
    (tmp_path / "something.txt").write_text("not a run")  # <tmp> is an existing, non-empty, non-run directory
    args = [a.replace("<tmp>", str(tmp_path)) for a in argv]
    p = subprocess.run([TUNELAB, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr and needle in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # nothing was started
