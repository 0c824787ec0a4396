"""`tunelab search` on the tiny model: trials train, the Pareto front is written, a rerun adds no trial, a larger
budget adds only the new ones; bad spaces are one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TUNELAB = str(Path(sys.executable).parent / "tunelab")


def _space(tmp_path: Path, trials: int) -> Path:
    space = {
        "out": str(tmp_path / "s"), "trials": trials, "seed": 0, "score": "val_loss",
        "base": {"model": {"name": "tiny-llama"},
                 "data": {"train": "builtin:code_instructions", "max_length": 256, "valid_size": 0.25, "limit": 24},
                 "train": {"lr": 1e-2, "max_steps": 2, "batch_size": 2, "save_every": 0, "tensorboard": False,
                           "mixed_precision": "no"},
                 "eval": {"before": False, "after": False}},
        "space": [{"name": "lora", "r": {"int": [1, 8], "log": True}, "target_modules": {"subset": ["q_proj", "v_proj"]}},
                  {"name": "houlsby", "reduction_factor": {"categorical": [4, 16]}}],
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_search_writes_a_pareto_front_and_resumes(tmp_path: Path) -> None:
    p = subprocess.run([TUNELAB, "search", str(_space(tmp_path, 3))], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "s"
    trials = json.loads((out / "search.json").read_text())["trials"]
    assert len(trials) == 3 and all(t["state"] == "COMPLETE" for t in trials)
    for t in trials:
        assert t["method"]["name"] in ("lora", "houlsby") and t["trainable_params"] > 0 and t["score"] > 0
        summary = json.loads((Path(t["run"]) / "summary.json").read_text())
        assert summary["trainable_params"] == t["trainable_params"] and summary["val_loss_after"] == t["score"]
    front = json.loads((out / "pareto.json").read_text())
    assert front
    # Pareto: no trial is at least as good on both objectives and strictly better on one
    for f in front:
        assert not any(t["score"] <= f["score"] and t["trainable_params"] <= f["trainable_params"]
                       and (t["score"], t["trainable_params"]) != (f["score"], f["trainable_params"]) for t in trials)
    assert (out / "search.png").stat().st_size > 1000 and "| 0 |" in (out / "search.md").read_text()

    p = subprocess.run([TUNELAB, "search", str(_space(tmp_path, 3))], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and len(json.loads((out / "search.json").read_text())["trials"]) == 3  # nothing rerun
    p = subprocess.run([TUNELAB, "search", str(_space(tmp_path, 4))], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [t["number"] for t in json.loads((out / "search.json").read_text())["trials"]] == [0, 1, 2, 3]


@pytest.mark.parametrize(("space", "msg"), [
    ({"space": []}, "no method templates"),
    ({"space": [{"r": 4}]}, "needs a name"),
    ({"space": [{"name": "lora", "r": {"uniform": [1, 2]}}]}, "a distribution is one of"),
    ({"space": [{"name": "lora"}], "score": "pass@1"}, "score: use val_loss or"),
])
def test_bad_space_is_one_line(tmp_path: Path, space: dict, msg: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(space))
    p = subprocess.run([TUNELAB, "search", str(path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert msg in p.stderr.strip().splitlines()[-1]
