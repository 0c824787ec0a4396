"""`tunelab compare` on the tiny model: a grid of three cells (two train, one fails), base evaluated once, cells
compared with it problem by problem; a rerun trains nothing again; bad grids are one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TUNELAB = str(Path(sys.executable).parent / "tunelab")


def _grid(tmp_path: Path) -> Path:
    grid = {
        "out": str(tmp_path / "cmp"),
        "base": {
            "model": {"name": "tiny-llama"},
            "data": {"train": "builtin:code_instructions", "max_length": 256, "valid_size": 0.25, "limit": 24},
            "train": {"lr": 1e-2, "max_steps": 2, "batch_size": 2, "save_every": 0, "tensorboard": False, "mixed_precision": "no"},
            "eval": {"tasks": [{"name": "humaneval", "limit": 2, "max_new_tokens": 8}]},
        },
        "cells": [
            {"label": "lora", "method": {"name": "lora", "r": 2}},
            {"label": "ia3", "method": {"name": "peft", "type": "ia3"}},
            {"label": "nothing", "method": {"name": "freeze"}},  # selects no parameter: fails, the grid goes on
        ],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_compare_grid_runs_records_failures_and_resumes(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    p = subprocess.run([TUNELAB, "compare", str(grid)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "cmp"
    data = json.loads((out / "compare.json").read_text())
    cells = {c["label"]: c for c in data["cells"]}
    assert [c["label"] for c in data["cells"]] == ["lora", "ia3", "nothing"]
    assert cells["lora"]["status"] == cells["ia3"]["status"] == "done"
    assert cells["nothing"]["status"] == "failed" and "no parameter to train" in cells["nothing"]["error"]
    assert cells["lora"]["trainable_params"] > 0 and cells["lora"]["total_params"] > cells["lora"]["trainable_params"]
    assert "pass@1" in data["base"]["humaneval"]
    vs = cells["ia3"]["scores"]["humaneval"]["vs_base"]
    assert vs["problems"] == 2 and vs["verdict"].startswith(("no detectable change", "better", "worse"))
    md = (out / "compare.md").read_text()
    assert "| lora | lora |" in md and "| nothing | freeze |" in md and "failed" in md
    assert (out / "compare.png").stat().st_size > 1000
    assert not (out / "cells" / "lora" / "eval" / "humaneval" / "before").exists()  # base evaluated once
    stamp = (out / "cells" / "lora" / "summary.json").stat().st_mtime_ns

    p = subprocess.run([TUNELAB, "compare", str(grid)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "cells" / "lora" / "summary.json").stat().st_mtime_ns == stamp  # finished cells are not rerun
    assert "cell lora" not in p.stderr and "cell nothing" in p.stderr  # only the failed cell is retried


@pytest.mark.parametrize(("cells", "msg"), [
    ([], "the grid has no cells"),
    ([{"label": "a", "method": {"name": "lora"}}, {"label": "a", "method": {"name": "full"}}], "must be unique"),
    ([{"label": "a", "method": {"name": "lorra"}}], "cell 'a'"),
    ([{"label": "a b", "method": {"name": "lora"}}], "plain name"),
])
def test_bad_grid_is_one_line(tmp_path: Path, cells: list, msg: str) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"base": {"model": {"name": "tiny-llama"}}, "cells": cells, "out": str(tmp_path / "o")}))
    p = subprocess.run([TUNELAB, "compare", str(path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert msg in p.stderr.strip().splitlines()[-1]
