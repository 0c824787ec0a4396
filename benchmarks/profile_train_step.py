"""Where a tunelab training step spends its time and memory (CPU), on the same setup as train_throughput.py.

Builds the run exactly as `tunelab.train.loop.train` does (tunelab's config, data pipeline, LoRA method, SFT
objective, optimizer), then for `--steps` optimizer steps after `--warmup` steps:

- phase wall times: data (collate), forward+loss, backward, grad clip, optimizer step;
- a torch.profiler table of self CPU time grouped by what the op belongs to: LM head matmuls (a vocab-sized
  dimension), LoRA matmuls (a rank-sized dimension), base linear matmuls, attention (SDPA), cross-entropy, dropout,
  other element-wise ops, the optimizer;
- activation memory: bytes saved for backward per token, by module kind (saved-tensor hooks, storages counted once),
  and the peak RSS.

    python benchmarks/profile_train_step.py                    # 1 packed row per micro-batch
    python benchmarks/profile_train_step.py --batch-size 2 --no-packing
"""

from __future__ import annotations

import argparse
import atexit
import json
import re
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import DEFAULT_MBPP, IGNORE, RESULTS, mbpp_chats  # noqa: E402


def build(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tunelab.config import load_config
    from tunelab.data import build_data
    from tunelab.methods import METHODS
    from tunelab.models import load_model
    from tunelab.objectives import OBJECTIVES
    from tunelab.train.optim import build_optimizer, param_groups

    if a.attention == "tunelab_packed" and a.no_packing:
        raise SystemExit("--attention tunelab_packed is per-sample attention for packed rows")
    tmp = Path(tempfile.mkdtemp(prefix="tl-prof-"))
    atexit.register(shutil.rmtree, tmp, True)
    data_file = tmp / "mbpp_train.jsonl"
    with data_file.open("w") as f:
        for user, code in mbpp_chats(Path(a.mbpp)):
            f.write(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": code}]}) + "\n")
    cfg = load_config(None, [
        "model.name=smollm2-135m-instruct", "model.dtype=float32", f"data.train={data_file}", "data.valid_size=0",
        f"data.max_length={a.max_length}", f"data.packing={str(not a.no_packing).lower()}", "method.name=lora",
        "method.r=16", "method.alpha=32", f"method.dropout={a.lora_dropout}", "method.target_modules=all-linear",
        f"train.batch_size={a.batch_size}", "train.mixed_precision='no'", f"train.num_threads={a.threads}",
        f"train.lr={a.lr}", "train.weight_decay=0",
    ] + ([f"model.attn_implementation={a.attention}"] if a.attention else []) + (a.set or []))
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, tok = load_model(cfg.model, "cpu")
    method = METHODS.get(cfg.method.name)(cfg.method)
    model = method.apply(model)
    model.train()
    objective = OBJECTIVES.get(cfg.objective.name)(cfg.objective)
    data = build_data(cfg.data, tok, cfg.train.batch_size, cfg.train.seed)
    opt = build_optimizer(param_groups(model, cfg.train.lr, 0.0), cfg.train)
    return {"cfg": cfg, "model": model, "objective": objective, "data": data, "opt": opt}


def step(env: dict[str, Any], index: int, times: dict[str, float] | None = None) -> dict[str, int]:
    import torch

    data, model, objective, opt = env["data"].train, env["model"], env["objective"], env["opt"]
    order = env.setdefault("order", data.order(0))
    t = time.perf_counter()
    batch = data.batch(0, index % len(data), order)
    real = int(batch.pop("real_tokens"))
    t1 = time.perf_counter()
    n = objective.num_items(batch)
    loss, _ = objective.loss(model, batch, n)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    t4 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t5 = time.perf_counter()
    if times is not None:
        for k, v in (("data", t1 - t), ("forward+loss", t2 - t1), ("backward", t3 - t2), ("clip", t4 - t3),
                     ("optimizer", t5 - t4)):
            times[k] += v
    return {"loss": round(float(loss), 6), "real_tokens": real, "fed_tokens": int(batch["input_ids"].numel()), "label_tokens": n,
            "width": int(batch["input_ids"].shape[1]), "rows": int(batch["input_ids"].shape[0])}


def categorize(name: str, shapes: list[Any], vocab: int, rank: int) -> str:
    dims = {d for s in shapes if isinstance(s, list | tuple) for d in s if isinstance(d, int)}
    if "scaled_dot_product" in name or "attention" in name.lower():
        return "attention (SDPA)"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        if vocab in dims:
            return "LM head matmul"
        if rank in dims:
            return "LoRA matmul"
        return "base linear matmul"
    if re.search(r"log_softmax|nll_loss|cross_entropy|argmax", name):
        return "cross-entropy / metrics"
    if re.search(r"bernoulli|dropout", name):
        return "dropout (RNG)"
    if re.search(r"copy_|cat|index|masked|nonzero|where|fill_|zero_|empty|clone|contiguous|to_copy", name):
        return "copies / indexing / masks"
    return "other element-wise (mul, add, silu, norm, rope)"


def profile_ops(env: dict[str, Any], steps: int, start: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    lm = env["model"].get_base_model()
    vocab = lm.get_output_embeddings().weight.shape[0]
    rank = env["cfg"].method.r
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(steps):
            step(env, start + i)
    totals: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        anc, in_opt = ev, False
        while anc is not None:
            if anc.name.startswith("Optimizer.step") or anc.name.startswith("Optimizer.zero_grad"):
                in_opt = True
                break
            anc = anc.cpu_parent
        cat = "optimizer" if in_opt else categorize(ev.name, ev.input_shapes or [], vocab, rank)
        totals[cat] += ev.self_cpu_time_total / 1e6
    total = sum(totals.values())
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    return {"seconds": {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
            "share": {k: round(v / total, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
            "top_ops": table}


def saved_memory(env: dict[str, Any], index: int) -> dict[str, Any]:
    """Bytes saved for backward during one micro-batch's forward+loss, by the kind of module that saved them."""
    import torch

    model = env["model"]
    stack: list[str] = ["(outside modules)"]

    def kind(name: str, mod: Any) -> str:
        last = name.split(".")[-1]
        if "lora_dropout" in name:
            return "LoRA dropout"
        if "lora_A" in name or "lora_B" in name:
            return "LoRA A/B"
        if last == "base_layer":
            return "base linear"
        if last in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            return "LoRA wrapper (scale, add)"
        if last == "self_attn":
            return "attention (rope, repeat_kv, sdpa)"
        if last == "act_fn" or last == "mlp":
            return "MLP (silu, gate*up)"
        if "norm" in last:
            return "RMSNorm"
        if last == "lm_head":
            return "LM head"
        if last == "embed_tokens":
            return "embedding"
        return type(mod).__name__

    def enter(k: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            stack.append(k)

        return hook

    def leave(module: Any, args: Any, output: Any) -> None:
        stack.pop()

    handles = []
    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(enter(kind(name, mod))))
        handles.append(mod.register_forward_hook(leave))
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    seen: set[tuple[int, int]] = set()
    by: dict[str, int] = defaultdict(int)

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if st.data_ptr() not in params and key not in seen:  # weights are not activations; count a storage once
            seen.add(key)
            by[stack[-1]] += st.nbytes()
        return t

    data = env["data"].train
    batch = data.batch(0, index % len(data), env.setdefault("order", data.order(0)))
    real = int(batch.pop("real_tokens"))
    n = env["objective"].num_items(batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = env["objective"].loss(model, batch, n)
    loss.backward()
    env["opt"].zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    fed = int(batch["input_ids"].numel())
    total = sum(by.values())
    return {"fed_tokens": fed, "real_tokens": real, "label_tokens": n, "saved_mb": round(total / 2**20, 1),
            "saved_kb_per_fed_token": round(total / fed / 1024, 1),
            "by_module_mb": {k: round(v / 2**20, 1) for k, v in sorted(by.items(), key=lambda kv: -kv[1])},
            "labels_ignored": int((batch["labels"] == IGNORE).sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mbpp", default=str(DEFAULT_MBPP))
    p.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch (packed rows unless --no-packing)")
    p.add_argument("--no-packing", action="store_true")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="profiled optimizer steps (one micro-batch each)")
    p.add_argument("--attention", choices=("sdpa", "eager", "tunelab_packed"), default=None,
                   help="attention implementation (tunelab_packed: tunelab's per-sample attention for packed rows, "
                   "what training uses on CPU by default)")
    p.add_argument("--set", action="append", help="extra tunelab config override, e.g. model.attn_implementation=eager")
    p.add_argument("--tag", default="profile_train_step", help="results file stem under benchmarks/results/")
    a = p.parse_args()

    env = build(a)
    warm = [step(env, i) for i in range(a.warmup)]
    times: dict[str, float] = defaultdict(float)
    shapes = []
    for i in range(a.steps):
        shapes.append(step(env, a.warmup + i, times))
    real = sum(s["real_tokens"] for s in shapes)
    wall = sum(times.values())
    rss_steps = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # before the profiler adds its own
    ops = profile_ops(env, a.steps, a.warmup + a.steps)
    mem = saved_memory(env, a.warmup)
    res = {
        "command": "python " + " ".join(["benchmarks/profile_train_step.py", *sys.argv[1:]]),
        "settings": vars(a) | {"mbpp": "(default)" if a.mbpp == str(DEFAULT_MBPP) else a.mbpp},
        "warmup_batches": warm, "batches": shapes, "real_tokens_per_s": round(real / wall, 1),
        "phase_seconds": {k: round(v, 2) for k, v in times.items()},
        "phase_share": {k: round(v / wall, 3) for k, v in times.items()},
        "ops_self_cpu_seconds": ops["seconds"], "ops_share": ops["share"],
        "saved_for_backward": mem, "peak_rss_mb_training_steps": rss_steps, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.tag}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "batches"}, indent=2))
    print(ops["top_ops"])


if __name__ == "__main__":
    main()
