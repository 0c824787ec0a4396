"""Evaluation throughput: tunelab's HumanEval evaluation vs a naive per-problem loop, on the embedded model.

Both sides evaluate the same problems with the same prompts (HumanEval chat prompt rendered with the
model's chat template, tokenized by `tunelab.generate.Engine.encode`), the same greedy decoding (float32,
`max_new_tokens` 384, the model's EOS ids, no repetition penalty) and the same code extraction
(`HumanEval.program`). What differs is only how the work is done:

* tunelab: `tunelab.evaluate.runner.evaluate_tasks`: continuous batching over one KV cache
  (`--batch-size` live rows), programs judged in the sandbox (`execute_many`, one worker per core) while
  generation goes on, samples.jsonl/summary.json written;
* naive: for each problem, `model.generate` on that one prompt, then `subprocess.run` of the program with a
  10 s timeout, pass = exit status 0. tunelab's rules forbid running model output outside a jail, so the
  naive loop's process is started under a minimal bubblewrap jail (read-only root, no network, private
  /tmp; `bwrap` adds ~10 ms to a start) when `bwrap` works, else without a jail (`naive_isolation` says which).
  Its cost is one process start per problem, as in the usual naive harnesses.

Also measured: sandbox throughput, trivial programs (`assert 1 + 1 == 2`) per second through
`execute_many` with full isolation on all cores.

Both sides run in this one process, one after the other, with `torch.set_num_threads(--threads)`.
Greedy decoding in a batch is not bit-identical to decoding one row alone (other matmul shapes, other
float summation order), so a near-tie can flip a token; the result lists how many completions are
identical and which problems' verdicts differ.

    .venv/bin/python benchmarks/eval_throughput.py                  # full HumanEval: ~35-45 min on 2 cores
    .venv/bin/python benchmarks/eval_throughput.py --limit 16 --tag eval_throughput_quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TARGET_RATIO = 0.3
NAIVE_TIMEOUT_S = 10.0


def naive_jail() -> list[str]:
    """The cheapest jail that keeps a naive loop from running model output with the host's rights."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return []
    argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--unshare-all", "--die-with-parent", "--new-session", "--chdir", "/tmp"]
    ok = subprocess.run([*argv, sys.executable, "-c", "pass"], capture_output=True, timeout=30)
    return argv if ok.returncode == 0 else []


def sandbox_throughput(n: int) -> dict[str, Any]:
    from tunelab.evaluate.sandbox import execute_many, isolation_summary

    execute_many(["assert 1 + 1 == 2"] * 4)  # the isolation probe and first start-up are not throughput
    t0 = time.perf_counter()
    results = execute_many(["assert 1 + 1 == 2"] * n)
    wall = time.perf_counter() - t0
    return {
        "sandbox_programs_per_s": round(n / wall, 2), "sandbox_programs": n, "sandbox_wall_s": round(wall, 2),
        "sandbox_all_passed": all(r.passed for r in results), "sandbox_isolation": isolation_summary(),
    }


def run_tunelab(model: Any, tok: Any, limit: int | None, max_new: int, batch_size: int, out: Path) -> dict[str, Any]:
    from tunelab.evaluate.runner import evaluate_tasks

    cfg = {"name": "humaneval", "max_new_tokens": max_new, "prompt_mode": "chat", **({"limit": limit} if limit else {})}
    t0 = time.perf_counter()
    evaluate_tasks(model, tok, [cfg], out, "bench", batch_size=batch_size, backend="hf", quiet=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "eval" / "humaneval" / "bench" / "samples.jsonl").open()]
    return {
        "wall_s": wall, "passed": {r["problem_id"]: bool(r["passed"]) for r in rows},
        "completions": {r["problem_id"]: r["completion"] for r in rows},
        "tokens": sum(r["n_tokens"] for r in rows),
    }


def run_naive(model: Any, tok: Any, limit: int | None, max_new: int, jail: list[str]) -> dict[str, Any]:
    import torch

    from tunelab.evaluate.tasks import TASKS
    from tunelab.generate import Engine
    from tunelab.generate.backends.hf import eos_ids

    task = TASKS.get("humaneval")(TASKS.parse({"name": "humaneval", "prompt_mode": "chat", "limit": limit}, "bench"),
                                  chat_template=True)
    encode = Engine(model, tok).encode  # only for the identical prompt tokens; no generation through it
    eos = eos_ids(model, tok)
    passed, completions, tokens = {}, {}, 0
    model.eval()
    t0 = time.perf_counter()
    for problem in task.problems():
        ids = torch.tensor([encode(task.prompt(problem))])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 do_sample=False, num_beams=1, repetition_penalty=1.0, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
        tokens += len(new)
        text = tok.decode(new, skip_special_tokens=True)
        program, _ = task.program(problem, text)
        try:
            proc = subprocess.run([*jail, sys.executable, "-I", "-"], input=program.encode(), capture_output=True,
                                  timeout=NAIVE_TIMEOUT_S)
            ok = proc.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        passed[problem.id], completions[problem.id] = ok, text
    return {"wall_s": time.perf_counter() - t0, "passed": passed, "completions": completions, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="first N HumanEval problems (default: all 164)")
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=16, help="tunelab's live rows in the continuous batch")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sandbox-programs", type=int, default=200)
    ap.add_argument("--tag", default="eval_throughput", help="results file name (benchmarks/results/TAG.json)")
    args = ap.parse_args()

    import torch

    from tunelab.config import ModelConfig
    from tunelab.models import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(ModelConfig(name="smollm2-135m-instruct", dtype="float32"))
    sandbox = sandbox_throughput(args.sandbox_programs)
    print(f"sandbox: {sandbox['sandbox_programs_per_s']} programs/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_tunelab(model, tok, args.limit, args.max_new_tokens, args.batch_size, Path(tmp))
    print(f"tunelab: {ours['wall_s']:.1f} s, {sum(ours['passed'].values())} passed", flush=True)
    jail = naive_jail()
    naive = run_naive(model, tok, args.limit, args.max_new_tokens, jail)
    print(f"naive: {naive['wall_s']:.1f} s, {sum(naive['passed'].values())} passed", flush=True)

    ids = list(naive["passed"])
    differ = [i for i in ids if ours["passed"][i] != naive["passed"][i]]
    ratio = ours["wall_s"] / naive["wall_s"]
    result = {
        "benchmark": "eval_throughput", "task": "humaneval", "n_problems": len(ids), "prompt_mode": "chat",
        "decoding": "greedy", "max_new_tokens": args.max_new_tokens, "dtype": "float32",
        "wall_time_ratio_vs_naive": round(ratio, 4), "target_ratio": TARGET_RATIO, "target_met": ratio <= TARGET_RATIO,
        "tunelab_wall_s": round(ours["wall_s"], 1), "naive_wall_s": round(naive["wall_s"], 1),
        "pass_count_tunelab": sum(ours["passed"].values()), "pass_count_naive": sum(naive["passed"].values()),
        "pass_at_1_tunelab": round(sum(ours["passed"].values()) / len(ids), 4),
        "pass_at_1_naive": round(sum(naive["passed"].values()) / len(ids), 4),
        "pass_counts_agree_within_1": abs(sum(ours["passed"].values()) - sum(naive["passed"].values())) <= 1,
        "verdicts_differ_on": differ,
        "identical_completions": sum(ours["completions"][i] == naive["completions"][i] for i in ids),
        "generated_tokens_tunelab": ours["tokens"], "generated_tokens_naive": naive["tokens"],
        "tokens_per_s_tunelab": round(ours["tokens"] / ours["wall_s"], 1),
        "tokens_per_s_naive": round(naive["tokens"] / naive["wall_s"], 1),
        "tunelab_batch_size": args.batch_size, "naive_isolation": "bwrap (ro root, no network)" if jail else "none",
        **sandbox,
        "passed_tunelab": sorted(i for i in ids if ours["passed"][i]),
        "passed_naive": sorted(i for i in ids if naive["passed"][i]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "processor": platform.processor() or platform.machine(),
                    "load_avg_at_end": os.getloadavg()},
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "tunelab")},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("passed_")}, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
