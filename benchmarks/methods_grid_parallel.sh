#!/usr/bin/env bash
# Run a `tunelab compare` grid with its cells trained in parallel (one process each, e.g. on one GPU), then let
# `tunelab compare` collect them: it finds every cell finished and only writes the table, the statistics and the
# plot. Cells run concurrently, so their wall times and peak memory are not comparable with sequential runs.
#   bash benchmarks/methods_grid_parallel.sh GRID.yaml [OUT_DIR_FOR_RESULTS]
set -u
GRID=$1
PY=${PYTHON:-python3}
$PY - "$GRID" <<'PY'
import sys, yaml
from pathlib import Path
from tunelab.compare import load_grid, cell_config
grid, out = load_grid(Path(sys.argv[1]))
(out / "configs").mkdir(parents=True, exist_ok=True)
for c in grid.cells:
    (out / "configs" / f"{c.label}.yaml").write_text(yaml.safe_dump(cell_config(grid, c, out), sort_keys=False))
(out / "parallel_cells.txt").write_text("\n".join(c.label for c in grid.cells) + "\n")
print(out)
PY
OUTDIR=$($PY -c "import sys; from pathlib import Path; from tunelab.compare import load_grid; print(load_grid(Path(sys.argv[1]))[1])" "$GRID")
mkdir -p "$OUTDIR/logs"
# build the model cache once, before many processes would race to build it
$PY -c "from tunelab.config import load_config; import yaml, sys; from tunelab.models import load_model; \
from tunelab.config import ModelConfig; c = yaml.safe_load(open(sys.argv[1]))['base'].get('model', {}); load_model(ModelConfig(**c), 'cpu')" "$GRID"
$PY -c "import sys; from pathlib import Path; from tunelab.compare import load_grid, cell_config, _base_eval; \
g, o = load_grid(Path(sys.argv[1])); _base_eval(g, cell_config(g, g.cells[0], o), o, True)" "$GRID" > "$OUTDIR/logs/base.log" 2>&1 &
while read -r label; do
  $PY -m tunelab.cli train "$OUTDIR/configs/$label.yaml" --quiet > "$OUTDIR/logs/$label.log" 2>&1 &
done < "$OUTDIR/parallel_cells.txt"
wait
$PY -m tunelab.cli compare "$GRID"
