"""DPO training: tunelab DPO vs tunelab SFT on the same sequences vs TRL's DPOTrainer (CPU, embedded model, LoRA).

Three runs, each a fresh subprocess (so peak RSS is per run), on the same preference pairs in the same order:

- `tunelab_dpo`: `objective: {name: dpo}` (sigmoid, beta 0.1), LoRA, `train.reference` left at its default
  (`auto`, which is the adapter switched off for LoRA: no second copy of the model), `data.packing=false`.
- `tunelab_sft`: the SFT objective on the same sequences: every pair gives two SFT samples, prompt+chosen and
  prompt+rejected, in that order, batch 2 x the DPO batch, so every step carries exactly the DPO step's sequences
  and tokens. The memory of DPO over SFT is what the reference pass and the pairwise loss cost.
- `trl_dpo`: `trl.DPOTrainer` with a peft `LoraConfig` equal to tunelab's (r, alpha, dropout, target modules) and
  TRL's defaults for a PEFT model otherwise (its reference = the same model with the adapter disabled, no
  precomputed reference log-probs, sigmoid loss, beta 0.1, padded batches since its `padding_free` is disabled).

Equal in all runs: pairs per step (`--batch-size`; the SFT run gets twice as many sequences), optimizer steps, lr and
its schedule (no warmup), AdamW (torch, betas 0.9/0.999, eps 1e-8, no weight decay), grad clip 1.0, seed, precision
(fp32 by default, `--bf16` for bf16 autocast over fp32 weights in both), `max_length` (per sequence; both cut the end
of a longer one), gradient checkpointing (off unless `--gradient-checkpointing`), no packing, no eval, no checkpoints,
torch threads. TRL's DPOConfig defaults `bf16=True` and `gradient_checkpointing=True`; both are set to the values
above, so only the tools differ. With `--lora-dropout 0` (the default) TRL keeps its default `disable_dropout=True`;
with a non-zero dropout it is set to False so that both tools train with that dropout.

Order: tunelab always shuffles its training rows with a seeded generator and has no option to turn that off, so the
tunelab children set `shuffle = False` on the train batches that `build_data` returns (measurement harness only;
nothing in tunelab is edited); TRL gets `train_sampling_strategy="sequential"`. Every child records the token ids
of every sequence it fed, and the parent checks that all three saw the same prompts and completions, step by step.

Input: `--pairs PATH`, JSONL rows with `prompt`, `chosen`, `rejected` (each a string or a message list). The
recorded run used pairs built from MBPP train (reference solution as chosen, a failing sample of the embedded
model as rejected) by `tunelab data build-pairs`:

    tunelab data build-pairs smollm2-135m-instruct --data mbpp.jsonl --split train --limit 200 --k 4 \
        --temperature 0.8 --batch-size 96 --out benchmarks/results/self_improve_pairs.jsonl

Measured per run: the end of every optimizer step (a post-step hook on the torch optimizer), the real
(non-padding) tokens of every micro-batch fed, CPU time, peak RSS (`ru_maxrss` up to the last optimizer step, and
at process end), the per-step loss and the preference metrics. Throughput = real tokens / wall seconds over the steps
after `--warmup-steps`. Results: `benchmarks/results/<tag>.json` and `<tag>.md` (default tag `dpo`).

    python benchmarks/dpo.py --pairs PAIRS.jsonl                      # defaults: first 64 pairs, 10 steps of 4 pairs
    python benchmarks/dpo.py --pairs PAIRS.jsonl --steps 3 --pairs-limit 16 --tag dpo_quick   # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# stdlib-only helpers of the SFT benchmark: the same step clock, RSS reading, machine/version records
from train_throughput import (  # noqa: E402
    IGNORE,
    RESULTS,
    StepClock,
    _busy_cpu_s,
    _sample_load,
    machine,
    model_dir,
    peak_rss_mb,
    ratio,
    rel,
    summarize,
    versions,
)

REPO = Path(__file__).resolve().parents[1]
RUNS = ("tunelab_dpo", "tunelab_sft", "trl_dpo")
TARGETS = {"peak_rss_ratio_vs_sft": ("max", 1.1), "peak_rss_ratio_vs_trl_dpo": ("max", 0.8),
           "throughput_ratio_vs_trl_dpo": ("min", 1.5)}
METRIC_NAMES = {  # TRL's metric names -> tunelab's
    "rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected", "rewards/accuracies": "rewards/accuracy",
    "rewards/margins": "rewards/margin", "logps/chosen": "logps/chosen", "logps/rejected": "logps/rejected",
}
ORDER_NOTE = (
    "tunelab has no option to disable its seeded per-epoch shuffle (data.Batches.order), so the tunelab children set "
    "shuffle=False on the train Batches that build_data returns (a wrapper in this script; tunelab itself is "
    "unchanged); TRL runs with train_sampling_strategy='sequential'. Both therefore read the pairs file top to "
    "bottom. Verified from the token ids every child fed (sequence_check)."
)


# ------------------------------------------------------------------------------------------------ data


def as_messages(value: Any, role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"expected a string or a list of {{role, content}} messages, got {type(value).__name__}")


def load_pairs(path: Path, limit: int | None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The first `limit` usable pairs, as message lists (prompt, chosen, rejected); identical pairs are skipped
    (tunelab drops them, TRL would keep them), so both tools get the same list."""
    out, skipped = [], Counter()
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
            if missing:
                raise SystemExit(f"{path}:{n}: missing {', '.join(missing)} (rows need prompt, chosen, rejected)")
            pair = {"prompt": as_messages(row["prompt"], "user"), "chosen": as_messages(row["chosen"], "assistant"),
                    "rejected": as_messages(row["rejected"], "assistant")}
            if pair["chosen"] == pair["rejected"]:
                skipped["identical_pair"] += 1
                continue
            out.append(pair)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise SystemExit(f"{path}: no usable pairs")
    return out, dict(skipped)


def write_inputs(pairs: list[dict[str, Any]], data_dir: Path) -> str:
    """pairs.jsonl (both DPO runs) and sft.jsonl (two samples per pair, chosen then rejected); returns the SFT
    `data.loss_on` that labels exactly the completion tokens of the pairwise encoding."""
    with (data_dir / "pairs.jsonl").open("w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    with (data_dir / "sft.jsonl").open("w") as f:
        for p in pairs:
            for side in ("chosen", "rejected"):
                f.write(json.dumps({"messages": p["prompt"] + p[side]}) + "\n")
    # the pairwise encoding labels the completion's assistant turns only; SFT with loss_on=assistant would also
    # label assistant turns inside a multi-turn prompt, last_turn labels the final turn only
    if not any(m["role"] == "assistant" for p in pairs for m in p["prompt"]):
        return "assistant"
    if all(len(p[s]) == 1 for p in pairs for s in ("chosen", "rejected")):
        return "last_turn"
    return "assistant"  # the sequence check reports the label differences


def fingerprint(ids: list[int], scored: list[int]) -> dict[str, Any]:
    """One fed sequence: its token ids and the span of tokens whose log-probs it scores (the completion)."""
    if scored and scored != list(range(scored[0], scored[-1] + 1)):
        raise SystemExit("a sequence's scored tokens are not contiguous: the sequence check assumes one completion")
    return {"ids": ids, "start": scored[0] if scored else len(ids), "end": scored[-1] + 1 if scored else len(ids)}


# ------------------------------------------------------------------------------------------------ children


def checksum(params: Any) -> dict[str, float]:
    """Order-independent summary of the trainable weights at optimizer creation (LoRA init)."""
    import torch

    tot = {"n": 0, "sum": 0.0, "abs": 0.0, "sq": 0.0}
    with torch.no_grad():
        for p in params:
            x = p.detach().double()
            tot["n"] += x.numel()
            tot["sum"] += float(x.sum())
            tot["abs"] += float(x.abs().sum())
            tot["sq"] += float((x * x).sum())
    return {k: (v if k == "n" else float(f"{v:.9g}")) for k, v in tot.items()}


def child_tunelab(a: argparse.Namespace, objective: str) -> dict[str, Any]:
    import torch

    import tunelab.data as tdata
    import tunelab.train.loop as tloop
    from tunelab.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix="tl-run-", dir=".")).resolve()  # cwd: the parent's temp dir
    data_dir = Path(a.data_dir)
    common = [
        f"model.name={a.model_dir}", "model.dtype=float32",
        f"model.gradient_checkpointing={str(a.gradient_checkpointing).lower()}",
        "data.valid_size=0", f"data.max_length={a.max_length}", "data.packing=false", "data.truncation=truncate",
        "method.name=lora", f"method.r={a.lora_r}", f"method.alpha={a.lora_alpha}", f"method.dropout={a.lora_dropout}",
        f"method.target_modules={a.target_modules}",
        f"train.lr={a.lr}", f"train.max_steps={a.steps}", "train.grad_accum=1", f"train.scheduler={a.scheduler}",
        "train.warmup_ratio=0", "train.weight_decay=0", "train.max_grad_norm=1.0",
        f"train.mixed_precision={'bf16' if a.bf16 else 'no'}", f"train.seed={a.seed}", "train.save_every=0",
        "train.log_every=1", "train.tensorboard=false", f"train.num_threads={a.threads}",
        "eval.before=false", "eval.after=false", f"out={tmp / 'run'}",
    ]
    if objective == "dpo":
        specific = [f"data.train={data_dir / 'pairs.jsonl'}", "objective.name=dpo", "objective.variant=sigmoid",
                    f"objective.beta={a.beta}", f"train.batch_size={a.batch_size}"]
    else:
        specific = [f"data.train={data_dir / 'sft.jsonl'}", "data.format=messages", f"data.loss_on={a.sft_loss_on}",
                    "objective.name=sft", f"train.batch_size={2 * a.batch_size}"]
    cfg = load_config(None, common + specific)

    # measurement only: no shuffling (see ORDER_NOTE), what each micro-batch carries, a post-step hook
    clock = StepClock()
    seqs: list[list[dict[str, Any]]] = []
    init: dict[str, Any] = {}
    build_data, build_optimizer, batch = tloop.build_data, tloop.build_optimizer, tdata.Batches.batch

    def ordered_data(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        bundle = build_data(*args, **kw)
        bundle.train.shuffle = False
        return bundle

    def recording_batch(self, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = batch(self, *args, **kw)
        if out["input_ids"].shape[0] != int(out["num_seqs"]):
            raise SystemExit("tunelab batch is packed: the benchmark needs one sequence per row (data.packing=false)")
        mask, lab = out["attention_mask"], out["labels"] != IGNORE
        rows = []
        for i in range(out["input_ids"].shape[0]):
            n, pos = int(mask[i].sum()), lab[i].nonzero().flatten()
            # labels are shifted: position t scores token t+1
            rows.append(fingerprint(out["input_ids"][i, :n].tolist(), (pos + 1).tolist()))
        seqs.append(rows)
        clock.feed(int(out["real_tokens"]), int(out["input_ids"].numel()), int(lab.sum()), len(rows))
        return out

    def hooked_optimizer(groups, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        init.update(checksum(p for g in groups for p in g["params"]))
        opt = build_optimizer(groups, *args, **kw)
        clock.attach(opt)
        return opt

    tloop.build_data, tloop.build_optimizer, tdata.Batches.batch = ordered_data, hooked_optimizer, recording_batch
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    result = tloop.train(cfg, quiet=True)
    train_call_s = time.perf_counter() - t0
    recs = [json.loads(ln) for ln in (result.run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    recs = [r for r in recs if "loss" in r]
    steps = clock.steps({r["step"]: r["loss"] for r in recs})
    prev_tok = 0
    for st, r in zip(steps, recs, strict=True):  # the loop's own count of real tokens must match what was fed
        if r["tokens"] - prev_tok != st["real_tokens"]:
            raise SystemExit(f"tunelab step {r['step']}: {r['tokens'] - prev_tok} real tokens logged, {st['real_tokens']} fed")
        prev_tok = r["tokens"]
        st["metrics"] = {k: r[k] for k in METRIC_NAMES.values() if k in r}
    return {"steps": steps, "sequences": seqs[: len(steps)], "train_call_s": train_call_s,
            "peak_rss_mb_train": steps[-1]["rss_mb"], "rss_mb_before_first_step": round(clock.marks[0]["rss_mb"], 1),
            "data": result.summary.get("data"),
            "trainable_params": result.summary.get("trainable_params"), "lora_init": init,
            "reference": cfg.train.reference + (" (adapter for LoRA)" if cfg.train.reference == "auto" else "")
            if objective == "dpo" else None}


def child_trl(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(a.threads)
    ds = Dataset.from_list([json.loads(ln) for ln in (Path(a.data_dir) / "pairs.jsonl").read_text().splitlines()])
    # the same RNG position as tunelab's loop when peft draws the LoRA A matrices: seed, load, wrap
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    tmp = Path(tempfile.mkdtemp(prefix="trl-run-", dir=".")).resolve()  # cwd: the parent's temp dir
    args = DPOConfig(
        output_dir=str(tmp), max_steps=a.steps, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
        learning_rate=a.lr, lr_scheduler_type=a.scheduler, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, seed=a.seed, data_seed=a.seed,
        bf16=a.bf16, fp16=False, gradient_checkpointing=a.gradient_checkpointing, use_cpu=True, report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=1, dataloader_num_workers=0,
        dataloader_pin_memory=False, disable_tqdm=True, train_sampling_strategy="sequential",
        max_length=a.max_length, beta=a.beta, loss_type=["sigmoid"],
        disable_dropout=a.lora_dropout == 0,  # TRL's default (True) when it changes nothing; else keep the dropout
    )
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                             target_modules=a.target_modules, bias="none")
    clock = StepClock()
    seqs: list[list[dict[str, Any]]] = []
    init: dict[str, Any] = {}
    edge_tokens: set[int] = set()  # decoded for the sequence check's report

    class CountingDPOTrainer(DPOTrainer):
        def create_optimizer(self, *args, **kw):  # noqa: ANN002, ANN003, ANN201
            init.update(checksum(p for p in self.model.parameters() if p.requires_grad))
            opt = super().create_optimizer(*args, **kw)
            clock.attach(opt)
            return opt

        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001, ANN201
            ids, mask, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
            half = ids.shape[0] // 2  # rows: all chosen, then all rejected
            rows = []
            for i in [j for k in range(half) for j in (k, half + k)]:  # -> chosen, rejected per pair, like tunelab
                # the logits at position t score token t+1: the first token is never scored
                n, pos = int(mask[i].sum()), comp[i, 1:].nonzero().flatten() + 1
                rows.append(fingerprint(ids[i, :n].tolist(), pos.tolist()))
                start = int(pos[0]) if pos.numel() else n
                edge_tokens.update(ids[i, max(0, start - 3) : start + 2].tolist() + ids[i, max(0, n - 4) : n].tolist())
            seqs.append(rows)
            clock.feed(int(mask.sum()), int(ids.numel()), int(comp[:, 1:].sum()), len(rows))
            return super().training_step(model, inputs, num_items_in_batch)

    class Start(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN201
            clock.start()

    trainer = CountingDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                 peft_config=peft_config, callbacks=[Start()])
    t0 = time.perf_counter()
    trainer.train()
    train_call_s = time.perf_counter() - t0
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    steps = clock.steps({k: h["loss"] for k, h in logs.items()})
    for st in steps:
        h = logs.get(st["step"], {})
        st["metrics"] = {ours: h[theirs] for theirs, ours in METRIC_NAMES.items() if theirs in h}
    return {"steps": steps, "sequences": seqs[: len(steps)], "train_call_s": train_call_s,
            "peak_rss_mb_train": steps[-1]["rss_mb"], "rss_mb_before_first_step": round(clock.marks[0]["rss_mb"], 1),
            "data": {"train_rows": len(trainer.train_dataset), "padding_free": bool(trainer.padding_free),
                     "ref_model_copy": trainer.ref_model is not None,
                     "precompute_ref_log_probs": bool(args.precompute_ref_log_probs),
                     "disable_dropout": bool(args.disable_dropout)},
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "lora_init": init, "token_texts": {str(t): tok.decode([t]) for t in sorted(edge_tokens)}}


def run_child(a: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    t0 = time.perf_counter()
    if a.child == "tunelab_dpo":
        out = child_tunelab(a, "dpo")
    elif a.child == "tunelab_sft":
        out = child_tunelab(a, "sft")
    elif a.child == "trl_dpo":
        out = child_trl(a)
    else:
        raise SystemExit(f"unknown run {a.child}")
    out["child_wall_s"] = time.perf_counter() - t0
    out["peak_rss_mb_process"] = round(peak_rss_mb(), 1)
    Path(a.json_out).write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------ parent


def compare_sequences(base: list[list[dict[str, Any]]], other: list[list[dict[str, Any]]],
                      texts: dict[str, str] | None = None) -> dict[str, Any]:
    """Did `other` feed the same sequences as `base`, step by step, in the same order, and score the same tokens?
    Token ids must be equal (or equal but for tokens appended at the end, counted by what they are); tokens that
    only one of the two scores are counted by what they are."""
    def show(ids: list[int]) -> str:
        return " ".join(f"{t}={(texts or {}).get(str(t), '?')!r}" for t in ids)

    out: dict[str, Any] = {"steps": min(len(base), len(other)), "sequences": 0, "identical_tokens": 0,
                           "same_scored_tokens": 0, "mismatched": 0}
    if len(base) != len(other):
        out["step_count_differs"] = [len(base), len(other)]
    trailing: Counter = Counter()
    only_other: Counter = Counter()
    only_base: Counter = Counter()
    for k, (sa, sb) in enumerate(zip(base, other, strict=False), 1):
        if len(sa) != len(sb):
            out["mismatched"] += max(len(sa), len(sb))
            out.setdefault("first_mismatch", {"step": k, "why": f"{len(sa)} vs {len(sb)} sequences"})
            continue
        for j, (x, y) in enumerate(zip(sa, sb, strict=True)):
            out["sequences"] += 1
            xi, yi = x["ids"], y["ids"]
            if xi == yi:
                out["identical_tokens"] += 1
            elif yi[: len(xi)] == xi:
                trailing[show(yi[len(xi) :])] += 1
            else:
                out["mismatched"] += 1
                out.setdefault("first_mismatch", {"step": k, "sequence": j, "why": "token ids differ"})
                continue
            if (x["start"], x["end"]) == (y["start"], y["end"]):
                out["same_scored_tokens"] += 1
            xs, ys = set(range(x["start"], x["end"])), set(range(y["start"], y["end"]))
            if ys - xs:
                only_other[show([yi[t] for t in sorted(ys - xs)])] += 1
            if xs - ys:
                only_base[show([xi[t] for t in sorted(xs - ys)])] += 1
    out["same_but_trailing_tokens"] = dict(trailing)
    out["scored_only_by_this_run"] = dict(only_other)
    out["scored_only_by_tunelab_dpo"] = dict(only_base)
    out["same_order"] = out["mismatched"] == 0 and "step_count_differs" not in out
    return out


def show_path(p: Path) -> str:
    """Relative to the current directory inside the repo, absolute outside it."""
    p = p.resolve()
    return rel(p) if p.is_relative_to(REPO) else str(p)


def sha(ids: list[int]) -> str:
    return hashlib.sha1(" ".join(map(str, ids)).encode()).hexdigest()[:12]


def loss_check(runs: dict[str, Any]) -> dict[str, Any] | None:
    a, b = runs.get("tunelab_dpo", {}).get("losses"), runs.get("trl_dpo", {}).get("losses")
    if not a or not b:
        return None
    d = [y - x for x, y in zip(a, b, strict=False) if x is not None and y is not None]
    out = {
        "per_step_loss_diff_trl_minus_tunelab": [round(x, 6) for x in d],
        "max_abs_diff": round(max(abs(x) for x in d), 6),
        "mean_abs_diff": round(sum(abs(x) for x in d) / len(d), 6),
        "max_rel_diff": round(max(abs(y - x) / abs(x) for x, y in zip(a, b, strict=False) if x), 6),
        "step1_expected": round(math.log(2), 6),  # the policy equals the reference before the first update
        "step1": {"tunelab_dpo": a[0], "trl_dpo": b[0]},
    }
    ia, ib = runs["tunelab_dpo"].get("lora_init"), runs["trl_dpo"].get("lora_init")
    out["lora_init_identical"] = bool(ia and ib and ia == ib)
    for key in ("logps/chosen", "logps/rejected", "rewards/margin", "rewards/accuracy"):
        ma = [m.get(key) for m in runs["tunelab_dpo"].get("step_metrics", [])]
        mb = [m.get(key) for m in runs["trl_dpo"].get("step_metrics", [])]
        if ma and mb and None not in ma and None not in mb:
            out[f"{key}_per_step"] = {"tunelab_dpo": [round(x, 4) for x in ma], "trl_dpo": [round(x, 4) for x in mb]}
    return out


def loss_notes(runs: dict[str, Any], seq_check: dict[str, Any]) -> list[str]:
    notes = []
    trl = seq_check.get("trl_dpo_vs_tunelab_dpo") or {}
    more, fewer = trl.get("scored_only_by_this_run") or {}, trl.get("scored_only_by_tunelab_dpo") or {}
    extra = trl.get("same_but_trailing_tokens") or {}
    if more or fewer or extra:
        notes.append(
            "Scored tokens by design: both feed the same token ids (the chat template renders each conversation "
            "through <|im_end|> and the newline after it), but TRL's completion mask covers every token after the "
            "prompt while tunelab scores the assistant turn through <|im_end|> only. "
            + (f"TRL also scores: {', '.join(f'{k} ({v} sequences)' for k, v in more.items())}. " if more else "")
            + (f"Only tunelab scores: {', '.join(f'{k} ({v} sequences)' for k, v in fewer.items())}. " if fewer else "")
            + (f"TRL's sequences are longer by: {', '.join(f'{k} ({v})' for k, v in extra.items())}. " if extra else "")
            + "The template's newline after <|im_end|> is near-certain under both the policy and the reference, so its "
            "log-ratio is ~0 and the margin and the loss move by a negligible amount (see loss_check; logps/chosen and "
            "logps/rejected differ by that token's log-prob).")
    notes += [
        "Normalisation: both report the mean over the step's pairs of -log sigmoid(beta * margin), margins from "
        "summed completion log-probs (tunelab: per-pair losses summed and divided by the pairs in the optimizer step; "
        "TRL: mean over the micro-batch; equal with grad_accum 1). Step 1 is log 2 = 0.693147 in both (the policy "
        "equals the reference before the first update).",
        "Reference pass: tunelab runs it in eval mode with the adapter off; TRL in train mode with the adapter off and "
        "(disable_dropout=True, its default, with LoRA dropout 0) no dropout anywhere, so both compute the same "
        "reference. Neither keeps a second copy of the model.",
        "Numerics: TRL computes log-probs with its fused LM head over every position (masking afterwards), tunelab "
        "projects only the labelled positions and takes log-softmax in fp32; summation orders differ, so the fp32 "
        "losses agree closely (on the order of 1e-5 per step in the development runs) but not bit for bit; under "
        "--bf16 autocast they differ more (not the same ops run in bf16 in the two tools).",
        "Truncation: both keep the first max_length tokens of a longer sequence (tunelab data.truncation=truncate, "
        "TRL truncation_mode=keep_start); see truncated_sequences per run (0 means no difference from it).",
    ]
    ia, ib = runs.get("tunelab_dpo", {}).get("lora_init"), runs.get("trl_dpo", {}).get("lora_init")
    ok = bool(ia) and ia == ib
    notes.append(
        "LoRA init: both seed torch with --seed, load the model and let peft draw the A matrices in the same order, so "
        "the initial adapters are identical (lora_init checksums equal) and the per-step losses are directly "
        "comparable after step 1." if ok else
        "LoRA init: the initial adapters differ between the tools (lora_init checksums), so after step 1 the losses "
        "follow two trajectories from different random A matrices and agree only in trend.")
    return notes


def summarize_run(raw: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    r = summarize(raw, a.warmup_steps)
    timed = raw["steps"][a.warmup_steps :]
    secs = sum(s["seconds"] for s in timed)
    r["pairs_per_s"] = round(sum(s["samples"] for s in timed) / 2 / secs, 3) if secs else None
    r["sequences_per_step"] = r.pop("samples_per_step")
    r["rss_mb_before_first_step"] = raw.get("rss_mb_before_first_step")
    r["step_metrics"] = [s.get("metrics", {}) for s in raw["steps"]]
    r["lora_init"] = raw.get("lora_init")
    r["truncated_sequences"] = sum(1 for st in raw["sequences"] for q in st if len(q["ids"]) >= a.max_length)
    if raw.get("reference"):
        r["reference"] = raw["reference"]
    if raw.get("token_texts"):
        r["token_texts"] = raw["token_texts"]
    return r


def settings(a: argparse.Namespace, pairs_path: Path, n_pairs: int, skipped: dict[str, int]) -> dict[str, Any]:
    return {
        "model": a.model_label, "pairs": show_path(pairs_path), "pairs_limit": a.pairs_limit, "pairs_used": n_pairs,
        "pairs_skipped": skipped, "steps": a.steps, "warmup_steps": a.warmup_steps,
        "batch_size_pairs": a.batch_size, "sft_batch_size_sequences": 2 * a.batch_size, "grad_accum": 1,
        "lr": a.lr, "scheduler": a.scheduler, "warmup": 0, "seed": a.seed, "threads": a.threads,
        "max_length": a.max_length, "precision": "bf16 autocast, fp32 weights" if a.bf16 else "fp32",
        "gradient_checkpointing": a.gradient_checkpointing, "packing": False, "beta": a.beta, "loss": "sigmoid",
        "lora": {"r": a.lora_r, "alpha": a.lora_alpha, "dropout": a.lora_dropout, "target_modules": a.target_modules},
        "sft_loss_on": a.sft_loss_on, "order": ORDER_NOTE,
        "trl_overrides_of_its_defaults": {
            "bf16": a.bf16, "gradient_checkpointing": a.gradient_checkpointing, "learning_rate": a.lr,
            "lr_scheduler_type": a.scheduler, "train_sampling_strategy": "sequential", "optim": "adamw_torch",
            "max_steps": a.steps, "per_device_train_batch_size": a.batch_size, "logging_steps": 1,
            "disable_dropout": a.lora_dropout == 0,
        },
    }


def derived(runs: dict[str, Any]) -> dict[str, Any]:
    def get(run: str, key: str) -> Any:
        return runs.get(run, {}).get(key)

    res: dict[str, Any] = {
        "peak_rss_ratio_vs_sft": ratio(get("tunelab_dpo", "peak_rss_mb"), get("tunelab_sft", "peak_rss_mb")),
        "peak_rss_ratio_vs_trl_dpo": ratio(get("tunelab_dpo", "peak_rss_mb"), get("trl_dpo", "peak_rss_mb")),
        "throughput_ratio_vs_trl_dpo": ratio(get("tunelab_dpo", "tokens_per_s"), get("trl_dpo", "tokens_per_s")),
        "pairs_per_s_ratio_vs_trl_dpo": ratio(get("tunelab_dpo", "pairs_per_s"), get("trl_dpo", "pairs_per_s")),
        "cpu_s_throughput_ratio_vs_trl_dpo": ratio(get("tunelab_dpo", "real_tokens_per_cpu_s"),
                                                   get("trl_dpo", "real_tokens_per_cpu_s")),
        "throughput_ratio_vs_sft": ratio(get("tunelab_dpo", "tokens_per_s"), get("tunelab_sft", "tokens_per_s")),
        "per_step_losses": {k: get(k, "losses") for k in ("tunelab_dpo", "trl_dpo", "tunelab_sft") if k in runs},
    }
    res["targets"] = {}
    for key, (kind, bound) in TARGETS.items():
        v = res[key]
        res["targets"][key] = {kind: bound, "met": None if v is None else (v <= bound if kind == "max" else v >= bound)}
    return res


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    m = res["machine"]

    def f(x: Any, d: int = 1) -> str:
        return "-" if x is None else f"{x:,.{d}f}"

    lines = [
        "# DPO training: tunelab DPO vs tunelab SFT (same sequences) vs TRL DPOTrainer (CPU)", "",
        f"Command (from the repo root): `{res['command']}`", "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['isa'])}), {m['mem_mb']} MB RAM. Versions: "
        + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v) + ".", "",
        f"Model {s['model']}, LoRA r={s['lora']['r']} alpha={s['lora']['alpha']} dropout={s['lora']['dropout']} "
        f"{s['lora']['target_modules']}, {s['precision']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}, no packing, {s['threads']} torch threads. Data: "
        f"{s['pairs_used']} pairs from `{s['pairs']}`, max_length {s['max_length']}. {s['steps']} optimizer steps of "
        f"{s['batch_size_pairs']} pairs (SFT: {s['sft_batch_size_sequences']} sequences, the same ones), lr {s['lr']} "
        f"{s['scheduler']} (no warmup), seed {s['seed']}, DPO sigmoid beta {s['beta']}. Throughput = real "
        f"(non-padding) tokens / wall time over steps {s['warmup_steps'] + 1}..{s['steps']}.", "",
        "| run | real tok/s | pairs/s | real tok per CPU-s | padding | seqs/step | real tok/step | s/step | "
        "RSS MB before step 1 | peak RSS MB | final loss | process wall s | "
        "other processes' CPU, timed steps (whole run), cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["runs"].items():
        lines.append(
            f"| {name} | {f(r['tokens_per_s'])} | {f(r['pairs_per_s'], 3)} | {f(r['real_tokens_per_cpu_s'])} | "
            f"{f(100 * r['padding_fraction'])}% | {f(r['sequences_per_step'], 1)} | {f(r['real_tokens_per_step'], 0)} | "
            f"{f(r['seconds_per_step'], 2)} | {f(r.get('rss_mb_before_first_step'), 0)} | {f(r['peak_rss_mb'], 0)} | {f(r['final_loss'], 4)} | "
            f"{f(r['process_wall_s'], 0)} | {f(r.get('other_processes_cores_timed'), 2)} "
            f"({f(r.get('other_processes_cores'), 2)}) |")
    lines += ["", "| ratio (tunelab DPO / other) | value | target | met |", "|---|---:|---:|---|"]
    for key in ("peak_rss_ratio_vs_sft", "peak_rss_ratio_vs_trl_dpo", "throughput_ratio_vs_trl_dpo",
                "pairs_per_s_ratio_vs_trl_dpo", "cpu_s_throughput_ratio_vs_trl_dpo", "throughput_ratio_vs_sft"):
        v, t = res.get(key), res["targets"].get(key)
        tgt = "-" if not t else ("&le; " + str(t["max"]) if "max" in t else "&ge; " + str(t["min"]))
        met = "-" if not t or t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {key} | {'-' if v is None else v} | {tgt} | {met} |")
    lc = res.get("loss_check")
    if lc:
        a, b = res["per_step_losses"]["tunelab_dpo"], res["per_step_losses"]["trl_dpo"]
        lines += ["", f"Per-step DPO loss (LoRA init identical in both: {'yes' if lc['lora_init_identical'] else 'no'}; "
                  f"max |diff| {lc['max_abs_diff']}):", "", "| step | tunelab DPO | TRL DPO | TRL - tunelab |",
                  "|---:|---:|---:|---:|"]
        for k, (x, y) in enumerate(zip(a, b, strict=False), 1):
            lines.append(f"| {k} | {x:.6f} | {y:.6f} | {y - x:+.2e} |")
    sc = res.get("sequence_check", {})
    if sc:
        lines += ["", "Same sequences in the same order (token ids of every fed sequence, per step, against tunelab DPO):", ""]
        for k, c in sc.items():
            lines.append(f"- {k}: {c['sequences']} sequences over {c['steps']} steps, "
                         f"{c['identical_tokens']} with identical token ids, "
                         + (f"{sum(c['same_but_trailing_tokens'].values())} equal but for trailing tokens "
                            f"{c['same_but_trailing_tokens']}, " if c.get("same_but_trailing_tokens") else "")
                         + f"{c['mismatched']} mismatched; "
                         f"{c['same_scored_tokens']} score the same tokens"
                         + (f", also scored by {k.split('_vs_')[0]}: {c['scored_only_by_this_run']}"
                            if c.get("scored_only_by_this_run") else "")
                         + (f", scored by tunelab DPO only: {c['scored_only_by_tunelab_dpo']}"
                            if c.get("scored_only_by_tunelab_dpo") else "")
                         + f" -> same order: {'yes' if c['same_order'] else 'NO'}")
    busy = [k for k, r in res["runs"].items()
            if (r.get("other_processes_cores_timed", r.get("other_processes_cores")) or 0) > 0.1]
    if busy:
        lines += ["", f"Warning: other processes used CPU during {', '.join(busy)}; those timings are skewed. "
                  "Re-measure a run with `--merge --runs NAME` (same other arguments)."]
    lines += ["", "Notes:", ""] + [f"- {n}" for n in res.get("notes", [])]
    return "\n".join(lines) + "\n"


def parent(a: argparse.Namespace) -> None:
    pairs_path = Path(a.pairs)
    pairs, skipped = load_pairs(pairs_path, a.pairs_limit)
    if a.steps * a.batch_size > len(pairs):
        print(f"note: {a.steps} steps x {a.batch_size} pairs > {len(pairs)} pairs: both tools start over from the "
              "first pair (same order) after one pass", flush=True)
    mdir = a.model_dir or model_dir()
    a.model_label = ("smollm2-135m-instruct (SmolLM2-135M-Instruct, fp32 weights)" if not a.model_dir
                     else f"model dir {a.model_dir}")
    out_json = RESULTS / f"{a.tag}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    argv = [rel(Path(sys.argv[0]).resolve()) if sys.argv[0].endswith(".py") else sys.argv[0], *sys.argv[1:]]
    command = "python " + " ".join(shlex.quote(x) for x in argv)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    runs: dict[str, Any] = {}
    raw_seqs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tl-dpo-bench-") as td:
        a.sft_loss_on = write_inputs(pairs, Path(td))
        sets = settings(a, pairs_path, len(pairs), skipped)
        prev: dict[str, Any] = {}
        if a.merge and out_json.is_file():
            prev = json.loads(out_json.read_text())
            if prev.get("settings") != sets:
                raise SystemExit(f"{out_json}: was measured with other settings; --merge needs the same ones")
            runs = {k: v for k, v in prev["runs"].items() if k not in a.runs}
        common = ["--data-dir", td, "--model-dir", mdir, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
                  "--lr", str(a.lr), "--scheduler", a.scheduler, "--seed", str(a.seed), "--threads", str(a.threads),
                  "--max-length", str(a.max_length), "--beta", str(a.beta), "--lora-r", str(a.lora_r),
                  "--lora-alpha", str(a.lora_alpha), "--lora-dropout", str(a.lora_dropout),
                  "--target-modules", a.target_modules, "--sft-loss-on", a.sft_loss_on,
                  *(["--bf16"] if a.bf16 else []), *(["--gradient-checkpointing"] if a.gradient_checkpointing else [])]
        for name in a.runs:
            out = Path(td) / f"{name}.json"
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            before = os.getloadavg()[0]
            loads: list[float] = []
            done = threading.Event()
            threading.Thread(target=_sample_load, args=(loads, done), daemon=True).start()
            busy0, child0 = _busy_cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", name, "--json-out",
                                   str(out), "--pairs", str(pairs_path), *common], env=env, cwd=td,
                                  stdout=None if a.verbose else subprocess.DEVNULL,
                                  stderr=None if a.verbose else subprocess.PIPE, text=True)
            done.set()
            if proc.returncode != 0:
                sys.stderr.write((proc.stderr or "")[-4000:])
                raise SystemExit(f"run {name} failed (exit {proc.returncode})")
            raw = json.loads(out.read_text())
            raw["parent_wall_s"] = time.perf_counter() - t0
            raw["loadavg_before"], raw["loadavg_after"] = before, os.getloadavg()[0]
            raw["loadavg_mean"] = round(sum(loads) / len(loads), 2) if loads else None
            child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            mine = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
            raw["other_processes_cores"] = round(max(0.0, _busy_cpu_s() - busy0 - mine) / raw["parent_wall_s"], 2)
            runs[name] = summarize_run(raw, a)
            # kept for the check below: a digest per sequence in the results, the ids only in memory
            raw_seqs[name] = raw["sequences"]
            runs[name]["sequence_digests"] = [[sha(q["ids"]) for q in st] for st in raw["sequences"]]
            r = runs[name]
            print(f"    {r['tokens_per_s']:.1f} real tok/s, {r['pairs_per_s']} pairs/s, {r['seconds_per_step']} s/step, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, losses {[round(x, 4) for x in r['losses']]}, "
                  f"wall {r['process_wall_s']:.0f}s, other processes {r['other_processes_cores']} cores", flush=True)

    runs = {k: runs[k] for k in RUNS if k in runs}
    res = derived(runs)
    # compared on token ids where both runs were measured now; with --merge a kept comparison stands when the
    # re-measured run fed exactly what it fed before (same settings, so the same sequences by construction)
    seq_check: dict[str, Any] = {}
    kept: set[str] = set()
    for other in ("trl_dpo", "tunelab_sft"):
        key = f"{other}_vs_tunelab_dpo"
        if "tunelab_dpo" in raw_seqs and other in raw_seqs:
            seq_check[key] = compare_sequences(raw_seqs["tunelab_dpo"], raw_seqs[other],
                                               runs[other].get("token_texts") or runs.get("trl_dpo", {}).get("token_texts"))
        elif key in prev.get("sequence_check", {}):
            seq_check[key] = prev["sequence_check"][key]
            kept.add(key)
    for name in raw_seqs:
        if name in prev.get("runs", {}):
            same = prev["runs"][name].get("sequence_digests") == runs[name]["sequence_digests"]
            for key in kept:
                if key.startswith(name) or key.endswith(name):
                    seq_check[key] = dict(seq_check[key], remeasured_run_fed_the_same_sequences=same,
                                          same_order=bool(seq_check[key].get("same_order")) and same)
    res["sequence_check"] = seq_check
    res["same_pairs_same_order"] = {"how": ORDER_NOTE, "verified": {k: v.get("same_order") for k, v in seq_check.items()}}
    res["loss_check"] = loss_check(runs)
    res.update({
        "command": command if not prev else f"{prev.get('command')} && {command}",
        "machine": machine(), "versions": versions(), "settings": sets,
        "notes": (a.note or []) + loss_notes(runs, seq_check),
        "runs": runs,
    })
    out_json.write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / f"{a.tag}.md").write_text(markdown(res))
    print(markdown(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", required=True, help="JSONL of prompt/chosen/rejected (see benchmarks/README.md)")
    p.add_argument("--pairs-limit", type=int, default=64, help="use the first N usable pairs (0: all)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps excluded from the throughput")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (the SFT run: 2x sequences)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--scheduler", choices=("cosine", "linear", "constant"), default="cosine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every run")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per sequence (prompt + completion)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="0 by default: TRL's DPOConfig disables every dropout by default (disable_dropout=True)")
    p.add_argument("--target-modules", default="all-linear")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights) in every run; default fp32")
    p.add_argument("--gradient-checkpointing", action="store_true", help="in every run (default off in every run)")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    p.add_argument("--merge", action="store_true",
                   help="re-measure only --runs and keep the other runs of <tag>.json (same settings required)")
    p.add_argument("--tag", default="dpo", help="results file stem under benchmarks/results/")
    p.add_argument("--note", action="append", help="a note recorded with the results (repeatable)")
    p.add_argument("--verbose", action="store_true", help="show the children's output")
    p.add_argument("--model-dir", default=None,
                   help="a transformers model dir (e.g. a random-init model) instead of the embedded model")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--sft-loss-on", default="assistant", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.steps <= a.warmup_steps:
        p.error("--steps must exceed --warmup-steps")
    if a.pairs_limit == 0:
        a.pairs_limit = None
    if a.child:
        run_child(a)
    else:
        parent(a)


if __name__ == "__main__":
    main()
