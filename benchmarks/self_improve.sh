#!/usr/bin/env bash
# On-policy self-improvement on the embedded model (issue 7, section 6), end to end with tunelab's CLI:
#   1. pass@1 of the base model on MBPP test (task_ids 11-510), greedy, chat prompt;
#   2. `tunelab data build-pairs`: K samples per MBPP-train problem (601-974) at temperature 0.8, each run against
#      the problem's tests in the sandbox; a passing sample is chosen, a failing one rejected (the reference
#      solution is chosen where no sample passes, marked chosen_source=reference);
#   3. DPO (configs/recipes/self_improve_dpo.yaml) and ORPO (configs/recipes/self_improve_orpo.yaml) with LoRA on
#      those pairs;
#   4. pass@1 of each tuned model on MBPP test, same settings as 1; summary in $OUT_DIR/self_improve.json.
# Usage: benchmarks/self_improve.sh MBPP_JSONL OUT_DIR [K]
# Environment: TL (the tunelab command), MODEL (default smollm2-135m-instruct), BS (generation batch, 64),
# LIMIT (first N problems of each split: smoke runs only), EXTRA (train overrides, e.g. "train.max_steps=2").
set -euo pipefail
MBPP=$1; W=$2; K=${3:-8}; BS=${BS:-64}
TL=${TL:-tunelab}; MODEL=${MODEL:-smollm2-135m-instruct}; LIM=${LIMIT:+--limit $LIMIT}
mkdir -p "$W"
t0=$(date +%s)
$TL eval "$MODEL" --task mbpp --data "$MBPP" --split test $LIM --batch-size "$BS" --out "$W/base" --quiet
t1=$(date +%s)
$TL data build-pairs "$MODEL" --data "$MBPP" --split train $LIM --k "$K" --temperature 0.8 --max-new-tokens 384 \
  --batch-size "$BS" --out "$W/pairs.jsonl" --quiet | tee "$W/pairs_stats.json"
t2=$(date +%s)
for obj in dpo orpo; do
  $TL train configs/recipes/self_improve_$obj.yaml data.train="$W/pairs.jsonl" model.name="$MODEL" ${EXTRA:-} \
    --out "$W/$obj" --overwrite --quiet
  $TL eval "$W/$obj" --task mbpp --data "$MBPP" --split test $LIM --batch-size "$BS" --out "$W/$obj" --quiet
done
t3=$(date +%s)
python3 - "$W" "$K" "$((t1 - t0))" "$((t2 - t1))" "$((t3 - t2))" <<'PY'
import json, os, sys
from pathlib import Path
w, k, t_base, t_pairs, t_train = Path(sys.argv[1]), int(sys.argv[2]), *map(int, sys.argv[3:])
def summ(d): return json.loads((d / "eval" / "mbpp" / "eval" / "summary.json").read_text())
base = summ(w / "base")
out = {"model": os.environ.get("MODEL", "smollm2-135m-instruct"), "k": k, "base_pass@1": base["metrics"]["pass@1"],
       "base_solved": sorted(p for p, r in base["per_problem"].items() if r["passed"]),
       "pairs": json.loads((w / "pairs_stats.json").read_text()), "isolation": base["isolation"],
       "seconds": {"base_eval": t_base, "build_pairs": t_pairs, "train_and_eval": t_train}}
for obj in ("dpo", "orpo"):
    s, run = summ(w / obj), json.loads((w / obj / "summary.json").read_text())
    solved = {p for p, r in s["per_problem"].items() if r["passed"]}
    before = set(out["base_solved"])
    out[obj] = {"pass@1": s["metrics"]["pass@1"], "fixed": sorted(solved - before), "broken": sorted(before - solved),
                "val_loss_before": run["val_loss_before"], "val_loss_after": run["val_loss_after"], "steps": run["steps"],
                "last_metrics": [json.loads(l) for l in (w / obj / "metrics.jsonl").read_text().splitlines() if '"loss"' in l][-1]}
(w / "self_improve.json").write_text(json.dumps(out, indent=2))
print(json.dumps({k: v for k, v in out.items() if k != "base_solved"}, indent=2))
PY
