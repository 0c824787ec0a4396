"""Assemble a `tunelab compare` table from cells trained elsewhere (their run summaries and eval summaries copied
back, e.g. from a GPU machine), with tunelab.compare's own table, statistics and plot code:

    python benchmarks/collect_grid.py OUT_DIR GRID.yaml

OUT_DIR holds base/done.json, configs/<label>.yaml and cells/<label>/{summary.json, eval/<task>/after/summary.json}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from tunelab.compare import _cell_results, _write


def main() -> None:
    out, grid_file = Path(sys.argv[1]), sys.argv[2]
    grid = yaml.safe_load(Path(grid_file).read_text())
    base = json.loads((out / "base" / "done.json").read_text())
    records = []
    for c in grid["cells"]:
        run = out / "cells" / c["label"]
        cfg = yaml.safe_load((out / "configs" / f"{c['label']}.yaml").read_text())
        records.append({"label": c["label"], "method": cfg["method"], "objective": cfg["objective"], "run": str(run),
                        "status": "done", **_cell_results(run)})
    _write(out, records, base)
    print((out / "compare.md").read_text())


if __name__ == "__main__":
    main()
