#!/usr/bin/env bash
# MBPP fine-tuning on the embedded model (issue 10, section 5): Austin et al. 2021 report that fine-tuning on
# MBPP's training problems raises pass@1 on its test problems by about 10 points across model sizes.
#   1. `tunelab data gold`: MBPP train (601-974) and validation (511-600) as SFT rows, in the chat prompt and in
#      the paper's 3-shot prompt (configs/recipes/mbpp_finetune_{chat,fewshot}.yaml say how);
#   2. pass@1 of the base model on MBPP test (11-510), greedy, once per prompt;
#   3. every cell below trains on the train split (validation split = validation loss) and is evaluated with
#      the prompt it was trained on, same settings as 2;
#   4. $W/mbpp_finetune.json: per cell pass@1 before/after, fixed/broken, exact McNemar p, paired bootstrap CI.
# Usage: benchmarks/mbpp_finetune.sh MBPP_JSONL OUT_DIR
# Environment: TL (the tunelab command), MODEL (default smollm2-135m-instruct), BS (generation batch, 128),
# PAR (1: base evaluations and cells run side by side, for a GPU; 0: one after another), CELLS (names, default
# all), LIMIT (first N test problems: smoke runs only), EXTRA (train overrides for every cell).
set -uo pipefail
MBPP=$(realpath "$1"); W=$2; BS=${BS:-128}; PAR=${PAR:-1}
TL=${TL:-tunelab}; MODEL=${MODEL:-smollm2-135m-instruct}; LIM=${LIMIT:+--limit $LIMIT}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$W/logs"
# the recipes are LoRA r16 all-linear at 2e-4 (lowest validation loss of these cells on the H200);
# method.name=full switches plugin (its LoRA fields are dropped)
declare -A CELL=(
  [chat_full]="chat method.name=full train.lr=2e-5"
  [chat_full_lr1e-4]="chat method.name=full train.lr=1e-4"
  [chat_lora]="chat train.lr=2e-4"
  [fewshot_full]="fewshot method.name=full train.lr=2e-5"
  [fewshot_lora]="fewshot train.lr=2e-4"
)
CELLS=${CELLS:-chat_full chat_full_lr1e-4 chat_lora fewshot_full fewshot_lora}

for mode in chat fewshot; do
  for split in train validation; do
    $TL data gold --data "$MBPP" --split $split --prompt-mode $mode --out "$W/${split}_$mode.jsonl" > "$W/logs/gold_${split}_$mode.json" || exit 1
  done
done

evaluate() {  # model mode out-dir
  local t0=$SECONDS
  $TL eval "$1" --task mbpp --data "$MBPP" --split test --prompt-mode "$2" $LIM --batch-size "$BS" --out "$3" --quiet \
    > "$W/logs/$(basename "$3")_eval.log" 2>&1
  local rc=$?; echo "$(basename "$3") eval rc=$rc $((SECONDS - t0)) s" >> "$W/logs/status"
}
cell() {  # name
  local name=$1 spec=(${CELL[$1]}) t0=$SECONDS; local mode=${spec[0]}
  $TL train "$HERE/configs/recipes/mbpp_finetune_$mode.yaml" model.name="$MODEL" data.train="$W/train_$mode.jsonl" \
    data.valid="$W/validation_$mode.jsonl" "eval.tasks=[]" "${spec[@]:1}" ${EXTRA:-} --out "$W/$name" --overwrite --quiet \
    > "$W/logs/${name}_train.log" 2>&1
  local rc=$?; echo "$name train rc=$rc $((SECONDS - t0)) s" >> "$W/logs/status"
  [ $rc -eq 0 ] && evaluate "$W/$name" "$mode" "$W/$name"
}
jobs_=()
run() { if [ "$PAR" = 1 ]; then "$@" & jobs_+=($!); else "$@"; fi; }
run evaluate "$MODEL" chat "$W/base_chat"
run evaluate "$MODEL" fewshot "$W/base_fewshot"
for c in $CELLS; do run cell "$c"; done
[ ${#jobs_[@]} -gt 0 ] && wait "${jobs_[@]}"
for c in $CELLS; do echo "$c|${CELL[$c]}"; done > "$W/cells.txt"

python3 "$HERE/benchmarks/mbpp_finetune_summary.py" "$W"
