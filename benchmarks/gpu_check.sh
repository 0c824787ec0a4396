#!/usr/bin/env bash
# GPU check on a lent CUDA machine (no network there): the unit/contract tests with CUDA visible, a tiny
# training run in bf16 with kill -9 + --resume, and the training-throughput benchmark on a random-init
# SmolLM2-135M-architecture model (the 98 MB embedded GGUF cannot travel; speed does not depend on weights).
# rouge-score has no wheel for the GPU image, so its one metric test is deselected there.
# Needs, prepared on the dev machine: .whl/ (wheels the GPU image lacks) and .gpucache/ (tokenizer, the
# SmolLM2 config, mbpp.jsonl). Writes logs under $OUT (or /tmp/gpu-out).
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src TUNELAB_CACHE=$PWD/.gpucache PYTHONUNBUFFERED=1
mkdir -p .gpucache/tokenizers/smollm2-135m-instruct && touch .gpucache/tokenizers/smollm2-135m-instruct/.complete
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)"
} > "$OUT/env.txt" 2>&1
rm -rf /tmp/runs
[ -n "${SKIP_TESTS:-}" ] || python3 -m pytest -q -p no:cacheprovider tests/unit tests/contract --ignore=tests/unit/test_sandbox.py \
  --ignore=tests/unit/test_sandbox_adversarial.py --deselect tests/unit/test_eval_tasks.py::test_generation_metrics_on_hand_made_references > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest.txt"
# tiny run: uninterrupted vs kill -9 after the first checkpoint + resume
tl() { python3 -c "from tunelab.cli import main; main()" "$@"; }
tl train configs/tiny/sft_lora.yaml --out /tmp/runs/a --quiet > "$OUT/tiny.txt" 2>&1
tl train configs/tiny/sft_lora.yaml --out /tmp/runs/b --quiet > /dev/null 2>&1 &
pid=$!; for _ in $(seq 600); do [ -f /tmp/runs/b/checkpoints/step-10/loop.json ] && break; sleep 0.2; done
kill -9 $pid; wait $pid 2>/dev/null
tl train configs/tiny/sft_lora.yaml --out /tmp/runs/b --resume --quiet >> "$OUT/tiny.txt" 2>&1
python3 - >> "$OUT/tiny.txt" 2>&1 <<'PY'
import json, torch
from safetensors.torch import load_file
a, b = (load_file(f"/tmp/runs/{r}/final/adapter_model.safetensors") for r in "ab")
print("resume bit-exact on GPU:", all(torch.equal(a[k], b[k]) for k in a), "max abs diff", max((a[k] - b[k]).abs().max().item() for k in a))
print("summary", json.load(open("/tmp/runs/a/summary.json"))["tokens_per_s"])
PY
python3 - <<'PY'
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
cfg = AutoConfig.from_pretrained(".gpucache/smol-config")
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg).save_pretrained("/tmp/smol-rand")
AutoTokenizer.from_pretrained(".gpucache/smol-config").save_pretrained("/tmp/smol-rand")
PY
# both tools train on the GPU (TRL's use_cpu follows CUDA), bf16 autocast, MFU against the GPU's measured bf16 matmul peak
timeout 420 python3 benchmarks/train_throughput.py --model-dir /tmp/smol-rand --mbpp "$PWD/.gpucache/mbpp.jsonl" --steps 20 --warmup-steps 3 \
  --batch-size 8 --precision bf16 --tag gpu_train_throughput --note "GPU, random-init SmolLM2-135M architecture, bf16" > "$OUT/bench.txt" 2>&1
echo "bench rc=$?" >> "$OUT/bench.txt"
cp benchmarks/results/gpu_train_throughput.* "$OUT/" 2>/dev/null
exit 0
