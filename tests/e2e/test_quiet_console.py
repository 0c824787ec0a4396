"""A quiet console: tunelab's own progress and results only; `--verbose` brings the libraries' output back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

TUNELAB = str(Path(sys.executable).parent / "tunelab")
NOISE = ("FutureWarning", "warnings.warn", "Loading weights", "UserWarning")


def _train(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
                                                            "PYTHONWARNINGS", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    return subprocess.run([TUNELAB, *flags, "train", str(REPO / "configs" / "tiny" / "sft_lora.yaml"), "--out",
                           str(tmp_path / f"run{len(flags)}"), "train.max_steps=2", "train.save_every=0"],
                          capture_output=True, text=True, timeout=300, env=env)


def test_default_console_shows_only_tunelab_and_verbose_shows_the_libraries(tmp_path: Path) -> None:
    quiet = _train(tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert not [n for n in NOISE if n in quiet.stderr + quiet.stdout], quiet.stderr[-2000:]
    assert "parameters train" in quiet.stderr and "verdict: validation loss" in quiet.stdout
    loud = _train(tmp_path, "--verbose")
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "FutureWarning" in loud.stderr  # transformers' deprecation warning during training is back
