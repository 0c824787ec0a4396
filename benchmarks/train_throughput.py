"""Training throughput: tunelab vs TRL's SFTTrainer on the embedded SmolLM2-135M-Instruct.

Same data (MBPP train split, task_ids 601-974, as chats), same LoRA (r=16, alpha=32, all-linear, dropout
`--lora-dropout`, default 0 as in peft and tunelab), same batch x grad_accum, optimizer steps, lr schedule, seed,
precision (`--precision fp32`, or `bf16` autocast over fp32 weights in both), completion-only loss, max_length 1024,
no gradient checkpointing, no eval, no saving during training. Each run is a fresh subprocess, so peak RSS is per run.

Model FLOP utilisation: before the runs, the parent measures this machine's dense matmul peak (fp32 and bf16, the
same thread count) and each run's MFU is its model FLOP/s over the peak of its precision. Model FLOPs per trained
token = 4 x the parameters of the model's matmuls (forward 2N, input gradients 2N; frozen weights need no weight
gradients; LoRA's own FLOPs and attention scores are left out), the same count for every run whatever it computes.

Runs (default): `tunelab` (packing, its default), `trl_padding` (SFTTrainer, packing=False: padded batches),
`trl_packing` (SFTTrainer, packing=True: its default "bfd" strategy, which turns padding_free on).
Optional: `tunelab_padding` (tunelab with data.packing=false), `trl_packing_bs1` (TRL packing with one packed row
per micro-batch and grad_accum = batch_size x grad_accum: the same rows per optimizer step, but no flattening of
several rows into one long padding-free sequence).

Throughput = real (non-padding) tokens of the batches actually fed / wall time, over optimizer steps after the
first `--warmup-steps` (excluded the same way in every run).

    python benchmarks/train_throughput.py                 # from the repo root; writes benchmarks/results/
    python benchmarks/train_throughput.py --precision bf16 --tag train_throughput_bf16
    python benchmarks/train_throughput.py --steps 6 --runs tunelab trl_padding   # a quick look

Defaults compare equal tokens per micro-batch: 4 samples (padding runs) against 1 packed row (~4.5 samples).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from shutil import which as shutil_which
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MBPP = REPO.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_RUNS = ("tunelab", "trl_padding", "trl_packing")
ALL_RUNS = (*DEFAULT_RUNS, "tunelab_padding", "trl_packing_bs1")
TRAIN_IDS = range(601, 975)  # MBPP's standard train split
IGNORE = -100
TARGETS = {"throughput_vs_trl_padding": 2.0, "throughput_vs_trl_packing": 1.3, "rss_vs_trl_padding": 0.8}


# ------------------------------------------------------------------------------------------------ data


def mbpp_chats(path: Path) -> list[tuple[str, str]]:
    """(user, assistant) for every MBPP train row: problem + tests -> reference code (CRLF -> LF)."""
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if row["task_id"] not in TRAIN_IDS:
                continue
            user = row["text"] + "\nYour code should pass these tests:\n" + "\n".join(row["test_list"])
            out.append((user, row["code"].replace("\r\n", "\n")))
    if len(out) != len(TRAIN_IDS):
        raise SystemExit(f"{path}: expected {len(TRAIN_IDS)} MBPP train rows (task_id 601-974), found {len(out)}")
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------ children


class StepClock:
    """Marks the end of every optimizer step (a post-step hook on the torch optimizer, in both tools), and what the
    micro-batches fed since the previous mark carried."""

    def __init__(self) -> None:
        self.marks: list[dict[str, Any]] = []
        self.micro: list[dict[str, int]] = []

    def _mark(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()  # kernels run asynchronously: a step ends when the GPU is done with it
        self.marks.append({"t": time.perf_counter(), "cpu": time.process_time(), "busy": _busy_cpu_s(),
                           "n_micro": len(self.micro), "rss_mb": peak_rss_mb()})

    def start(self) -> None:
        if not self.marks:
            self._mark()

    def attach(self, optimizer: Any) -> None:
        optimizer.register_step_post_hook(lambda *_: self._mark())

    def feed(self, real: int, fed: int, labels: int, samples: int) -> None:
        self.start()
        self.micro.append({"real": real, "fed": fed, "labels": labels, "samples": samples})

    def steps(self, losses: dict[int, float]) -> list[dict[str, Any]]:
        out = []
        for k, (prev, cur) in enumerate(zip(self.marks, self.marks[1:], strict=False), 1):
            mb = self.micro[prev["n_micro"] : cur["n_micro"]]
            out.append({
                "step": k, "loss": losses.get(k), "seconds": cur["t"] - prev["t"], "cpu_s": cur["cpu"] - prev["cpu"],
                "machine_busy_s": cur["busy"] - prev["busy"],
                "real_tokens": sum(m["real"] for m in mb), "fed_tokens": sum(m["fed"] for m in mb),
                "label_tokens": sum(m["labels"] for m in mb), "samples": sum(m["samples"] for m in mb),
                "micro_batches": len(mb), "rss_mb": round(cur["rss_mb"], 1),
            })
        return out


def child_tunelab(a: argparse.Namespace, packing: bool, batch_size: int) -> dict[str, Any]:
    import tunelab.data.batching._base as tbatch
    import tunelab.train.loop as tloop
    from tunelab.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix="tl-run-", dir=".")).resolve()  # cwd: the parent's temp dir
    data_file = tmp / "mbpp_train.jsonl"
    with data_file.open("w") as f:
        for user, code in mbpp_chats(Path(a.mbpp)):
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": code}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    overrides = [
        f"model.name={a.model_dir}", "model.dtype=float32", "model.gradient_checkpointing=false",
        f"data.train={data_file}", "data.valid_size=0", f"data.max_length={a.max_length}",
        f"data.packing={str(packing).lower()}", "data.format=messages", "data.loss_on=assistant",
        "method.name=lora", "method.r=16", "method.alpha=32", f"method.dropout={a.lora_dropout}", "method.target_modules=all-linear",
        f"train.lr={a.lr}", f"train.max_steps={a.steps}", f"train.batch_size={batch_size}",
        f"train.grad_accum={a.grad_accum}", f"train.scheduler={a.scheduler}", "train.warmup_ratio=0",
        "train.weight_decay=0", "train.max_grad_norm=1.0", f"train.mixed_precision={'bf16' if a.precision == 'bf16' else 'no'}",
        f"train.seed={a.seed}",
        "train.save_every=0", "train.log_every=1", "train.tensorboard=false", f"train.num_threads={a.threads}",
        "eval.before=false", "eval.after=false", f"out={tmp / 'run'}",
    ]
    cfg = load_config(None, overrides)

    # measurement only: wrap the collator (what each micro-batch carries) and the optimizer (a post-step hook)
    clock = StepClock()
    collate, build_optimizer = tbatch.collate_units, tloop.build_optimizer

    def counting_collate(samples, pad_id, packed):  # noqa: ANN001, ANN202
        batch = collate(samples, pad_id, packed)
        clock.feed(int(batch["real_tokens"]), int(batch["input_ids"].numel()), int((batch["labels"] != IGNORE).sum()),
                   sum(len(r) for r in samples))
        return batch

    def hooked_optimizer(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        opt = build_optimizer(*args, **kw)
        clock.attach(opt)
        return opt

    tbatch.collate_units, tloop.build_optimizer = counting_collate, hooked_optimizer
    t0 = time.perf_counter()
    result = tloop.train(cfg, quiet=True)
    train_call_s = time.perf_counter() - t0
    recs = [json.loads(ln) for ln in (result.run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    recs = [r for r in recs if "loss" in r]
    steps = clock.steps({r["step"]: r["loss"] for r in recs})
    prev_tok, prev_s = 0, 0.0
    for st, r in zip(steps, recs, strict=True):  # the loop's own count of real tokens must match what was fed
        if r["tokens"] - prev_tok != st["real_tokens"]:
            raise SystemExit(f"tunelab step {r['step']}: {r['tokens'] - prev_tok} real tokens logged, {st['real_tokens']} fed")
        st["loop_seconds"] = round(r["elapsed_s"] - prev_s, 3)  # tunelab's own per-step timer, for cross-checking
        prev_tok, prev_s = r["tokens"], r["elapsed_s"]
    return {"steps": steps, "train_call_s": train_call_s, "peak_rss_mb_train": steps[-1]["rss_mb"],
            "data": result.summary.get("data"), "trainable_params": result.summary.get("trainable_params")}


def child_trl(a: argparse.Namespace, packing: bool, rows_per_micro: int, grad_accum: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(a.threads)
    ds = Dataset.from_list([
        {"prompt": [{"role": "user", "content": u}], "completion": [{"role": "assistant", "content": c}]}
        for u, c in mbpp_chats(Path(a.mbpp))
    ])
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix="trl-run-", dir=".")).resolve()  # cwd: the parent's temp dir
    args = SFTConfig(
        output_dir=str(tmp), max_steps=a.steps, per_device_train_batch_size=rows_per_micro,
        gradient_accumulation_steps=grad_accum, learning_rate=a.lr, lr_scheduler_type=a.scheduler, warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        seed=a.seed, data_seed=a.seed, bf16=a.precision == "bf16", fp16=False, gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1, dataloader_num_workers=0,
        dataloader_pin_memory=False, disable_tqdm=True, max_length=a.max_length, packing=packing,
        completion_only_loss=True, assistant_only_loss=False,
    )
    peft_config = LoraConfig(
        task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=a.lora_dropout, target_modules="all-linear",
    )
    clock = StepClock()

    class CountingSFTTrainer(SFTTrainer):
        def create_optimizer(self, *args, **kw):  # noqa: ANN002, ANN003, ANN201
            opt = super().create_optimizer(*args, **kw)
            clock.attach(opt)
            return opt

        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001, ANN201
            ids = inputs["input_ids"]
            if "attention_mask" in inputs:  # padded batch
                real, samples = int(inputs["attention_mask"].sum()), int(ids.shape[0])
            else:  # padding-free: one flattened row, no padding (pad_to_multiple_of is None on CPU)
                real, samples = int(ids.numel()), int(inputs["cu_seq_lens_q"].numel() - 1)
            clock.feed(real, int(ids.numel()), int((inputs["labels"][:, 1:] != IGNORE).sum()), samples)
            return super().training_step(model, inputs, num_items_in_batch)

    class Start(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN201
            clock.start()

    trainer = CountingSFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config, callbacks=[Start()],
    )
    t0 = time.perf_counter()
    trainer.train()
    train_call_s = time.perf_counter() - t0
    steps = clock.steps({h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h})
    return {"steps": steps, "train_call_s": train_call_s, "peak_rss_mb_train": steps[-1]["rss_mb"],
            "data": {"train_rows": len(trainer.train_dataset), "padding_free": bool(trainer.padding_free)},
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}


def run_child(a: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    t0 = time.perf_counter()
    name = a.child
    packed_bs = a.packed_batch_size or a.batch_size
    if name == "tunelab":
        out = child_tunelab(a, True, packed_bs)
    elif name == "tunelab_padding":
        out = child_tunelab(a, False, a.batch_size)
    elif name == "trl_padding":
        out = child_trl(a, False, a.batch_size, a.grad_accum)
    elif name == "trl_packing":
        out = child_trl(a, True, packed_bs, a.grad_accum)
    elif name == "trl_packing_bs1":
        out = child_trl(a, True, 1, packed_bs * a.grad_accum)
    else:
        raise SystemExit(f"unknown run {name}")
    out["child_wall_s"] = time.perf_counter() - t0
    out["peak_rss_mb_process"] = round(peak_rss_mb(), 1)
    import torch

    out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None
    Path(a.json_out).write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------ parent


def summarize(raw: dict[str, Any], warmup: int) -> dict[str, Any]:
    steps = raw["steps"]
    timed = steps[warmup:]
    secs = sum(s["seconds"] for s in timed)
    cpu = sum(s["cpu_s"] for s in timed)
    busy = sum(s.get("machine_busy_s", float("nan")) for s in timed)
    real = sum(s["real_tokens"] for s in timed)
    fed = sum(s["fed_tokens"] for s in timed)
    losses = [s["loss"] for s in steps]
    last5 = [x for x in losses[-5:] if x is not None]
    return {
        "tokens_per_s": real / secs if secs else None,
        "fed_tokens_per_s": fed / secs if secs else None,
        "real_tokens_per_cpu_s": real / cpu if cpu else None, "cpu_utilisation": round(cpu / secs, 2) if secs else None,
        "timed_steps": len(timed), "timed_s": round(secs, 2), "timed_real_tokens": real, "timed_fed_tokens": fed,
        "padding_fraction": round(1 - real / fed, 4) if fed else None,
        "real_tokens_per_step": round(sum(s["real_tokens"] for s in steps) / len(steps), 1),
        "label_tokens_per_step": round(sum(s["label_tokens"] for s in steps) / len(steps), 1),
        "samples_per_step": round(sum(s["samples"] for s in steps) / len(steps), 2),
        "micro_batches_per_step": round(sum(s["micro_batches"] for s in steps) / len(steps), 2),
        "seconds_per_step": round(secs / len(timed), 2) if timed else None,
        "train_wall_s": round(sum(s["seconds"] for s in steps), 2),
        "process_wall_s": round(raw["parent_wall_s"], 2),
        "peak_rss_mb": raw["peak_rss_mb_train"], "peak_rss_mb_process_end": raw["peak_rss_mb_process"],
        "peak_gpu_mb": raw.get("peak_gpu_mb"),
        "final_loss": losses[-1], "mean_loss_last5": sum(last5) / len(last5) if last5 else None,
        "losses": losses, "step_seconds": [round(s["seconds"], 3) for s in steps],
        "trainable_params": raw.get("trainable_params"), "data": raw.get("data"),
        "loadavg_before": raw["loadavg_before"], "loadavg_after": raw["loadavg_after"],
        "loadavg_mean_during": raw.get("loadavg_mean"), "other_processes_cores": raw.get("other_processes_cores"),
        # the same over the timed steps only: what the rest of the machine used while tokens/s was measured
        "other_processes_cores_timed": round(max(0.0, busy - cpu) / secs, 2) if secs and busy == busy else None,
    }


def machine() -> dict[str, Any]:
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = f" {info.get('flags', '')} "
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                         check=False).stdout.strip() if shutil_which("nvidia-smi") else ""
    return {
        "gpu": gpu or None,
        "cpu": info.get("model name") or platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f} " in flags],
        "mem_mb": mem, "os": platform.platform(), "python": platform.python_version(),
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tunelab"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def model_dir() -> str:
    # in a child process, so the parent stays small (its RSS would otherwise be inherited by the exec'd children)
    code = "from tunelab.models.presets import smollm_model_dir; print(smollm_model_dir())"
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def ratio(x: float | None, y: float | None) -> float | None:
    return round(x / y, 3) if x is not None and y else None


def rel(p: Path) -> str:
    try:
        return os.path.relpath(p, Path.cwd())
    except ValueError:
        return str(p)


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = [
        f"# Training throughput: tunelab vs TRL SFTTrainer ({res['machine'].get('gpu') or 'CPU'})", "",
        f"Command (from the repo root): `{res['command']}`", "",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores ({', '.join(res['machine']['isa'])}), "
        f"{res['machine']['mem_mb']} MB RAM. Versions: "
        + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v) + ".", "",
        f"Model {s['model']}, LoRA r=16 alpha=32 dropout={s['lora']['dropout']} all-linear, {s.get('precision', 'fp32')}, no gradient checkpointing, "
        f"{s['threads']} torch threads. Data: MBPP train (task_id 601-974, {s['samples']} chats), completion-only "
        f"loss, max_length {s['max_length']}. {s['steps']} optimizer steps of batch {s['batch_size']} x grad_accum "
        f"{s['grad_accum']} (packing runs: {s['packed_batch_size']} packed rows per micro-batch), lr {s['lr']} {s['scheduler']} (no warmup), seed {s['seed']}. Throughput = real "
        f"(non-padding) tokens / wall time over steps {s['warmup_steps'] + 1}..{s['steps']} "
        f"(first {s['warmup_steps']} excluded).", "",
        "| run | real tok/s | fed tok/s | real tok per CPU-s | padding | samples/step | real tok/step | s/step | "
        "peak RSS MB | peak GPU MB | final loss | mean loss last 5 | process wall s | other processes' CPU, timed steps (whole run), cores | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    for name, r in res["runs"].items():
        def f(x: Any, d: int = 1) -> str:
            return "-" if x is None else f"{x:,.{d}f}"
        lines.append(
            f"| {name} | {f(r['tokens_per_s'])} | {f(r['fed_tokens_per_s'])} | {f(r['real_tokens_per_cpu_s'])} | "
            f"{f(100 * r['padding_fraction'])}% | "
            f"{f(r['samples_per_step'], 2)} | {f(r['real_tokens_per_step'], 0)} | {f(r['seconds_per_step'], 2)} | "
            f"{f(r['peak_rss_mb'], 0)} | {f(r.get('peak_gpu_mb'), 0)} | {f(r['final_loss'], 4)} | {f(r['mean_loss_last5'], 4)} | "
            f"{f(r['process_wall_s'], 0)} | {f(r.get('other_processes_cores_timed'), 2)} ({f(r.get('other_processes_cores'), 2)}) | "
            f"{pct(r.get('mfu'))} |"
        )
    peak = res.get("matmul_peak_gflops")
    if peak:
        lines += ["", f"MFU = model FLOP/s / this machine's measured dense matmul peak ({', '.join(f'{k} {v:,.0f} GFLOP/s' for k, v in peak.items())}"
                  f", {s['threads']} threads, measured in the same run). Model FLOPs = 4 x {res['model_matmul_params']:,} matmul "
                  "parameters per trained token (forward + input gradients; the base is frozen)."]
    lines += ["", "| ratio (tunelab / TRL) | value | target | met |", "|---|---:|---:|---|"]
    for key, target, better in (
        ("throughput_ratio_vs_trl_padding", TARGETS["throughput_vs_trl_padding"], "ge"),
        ("throughput_ratio_vs_trl_packing", TARGETS["throughput_vs_trl_packing"], "ge"),
        ("rss_ratio_vs_trl_padding", TARGETS["rss_vs_trl_padding"], "le"),
        ("rss_ratio_vs_trl_packing", None, "le"),
        ("gpu_mem_ratio_vs_trl_padding", None, "le"),
        ("cpu_s_throughput_ratio_vs_trl_padding", None, "ge"),
        ("cpu_s_throughput_ratio_vs_trl_packing", None, "ge"),
    ):
        v = res.get(key)
        met = "-" if v is None or target is None else ("yes" if (v >= target if better == "ge" else v <= target) else "NO")
        tgt = "-" if target is None else ("&ge; " if better == "ge" else "&le; ") + str(target)
        lines.append(f"| {key} | {'-' if v is None else v} | {tgt} | {met} |")
    for other in ("trl_packing", "trl_padding"):
        v = res.get(f"loss_delta_vs_{other}_last5")
        if v is not None:
            lines.append(f"| loss_delta_vs_{other}_last5 (tunelab - TRL, mean of last 5 steps) | {v:+.4f} | within noise | see below |")
    chk = res.get("loss_check_vs_trl_packing")
    if chk:
        lines += ["", f"Loss check: both packing runs train on the same packed rows in the same order. TRL also labels the "
                  f"newline after `<|im_end|>` (one near-certain token per sample), so its per-token mean is lower by the "
                  f"label-count ratio {chk['label_token_ratio_tunelab_over_trl']}; the measured per-step loss ratio "
                  f"TRL / tunelab averages {chk['mean_per_step_loss_ratio']} "
                  f"(per step: {', '.join(str(x) for x in chk['per_step_loss_ratio_trl_over_tunelab'])})."]
    busy = [k for k, r in res["runs"].items()
            if (r.get("other_processes_cores_timed", r.get("other_processes_cores")) or 0) > 0.1]
    if busy:
        lines += ["", f"Warning: other processes used CPU during {', '.join(busy)} (see the last column); those timings are "
                  "skewed. Re-measure a run with `--merge --runs NAME` (same other arguments)."]
    if res.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _sample_load(samples: list[float], done: threading.Event) -> None:
    """1-minute load average every 15 s while a run is going: other work on the machine skews the timings."""
    while not done.wait(15):
        samples.append(os.getloadavg()[0])


def settings(a: argparse.Namespace, mbpp: Path, samples: int) -> dict[str, Any]:
    return {
        "model": "smollm2-135m-instruct (SmolLM2-135M-Instruct, fp32)", "mbpp": rel(mbpp), "samples": samples,
        "steps": a.steps, "warmup_steps": a.warmup_steps, "batch_size": a.batch_size, "grad_accum": a.grad_accum,
        "packed_batch_size": a.packed_batch_size or a.batch_size, "lr": a.lr, "scheduler": a.scheduler,
        "seed": a.seed, "threads": a.threads, "max_length": a.max_length,
        "lora": {"r": 16, "alpha": 32, "dropout": a.lora_dropout, "target_modules": "all-linear"}, "precision": a.precision,
    }


def matmul_peak_gflops(threads: int, seconds: float = 3.0, n: int = 2048) -> dict[str, float]:
    """This machine's dense matmul throughput (n x n @ n x n) in fp32 and bf16, on the GPU when there is one (the
    device the runs train on; n = 8192 there, so the GPU is saturated)."""
    import torch

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device, n = ("cuda", 8192) if cuda else ("cpu", n)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        for _ in range(3):
            x @ y
        if cuda:
            torch.cuda.synchronize()
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            x @ y
            done += 1
            if cuda:
                torch.cuda.synchronize()
        out[name] = round(2 * n**3 * done / (time.perf_counter() - t0) / 1e9, 1)
    return out


def matmul_params(model_dir: str) -> int:
    """Parameters of the model's matmuls (every projection, the MLP and the LM head; no embedding lookup)."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    h, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads", heads) * (c.get("head_dim") or h // heads)
    return layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + vocab * h


def derived(runs: dict[str, Any]) -> dict[str, Any]:
    """Ratios tunelab / TRL, target checks, and the loss comparison."""

    def get(run: str, key: str) -> Any:
        return runs.get(run, {}).get(key)

    res: dict[str, Any] = {
        "throughput_ratio_vs_trl_padding": ratio(get("tunelab", "tokens_per_s"), get("trl_padding", "tokens_per_s")),
        "throughput_ratio_vs_trl_packing": ratio(get("tunelab", "tokens_per_s"), get("trl_packing", "tokens_per_s")),
        "rss_ratio_vs_trl_padding": ratio(get("tunelab", "peak_rss_mb"), get("trl_padding", "peak_rss_mb")),
        "rss_ratio_vs_trl_packing": ratio(get("tunelab", "peak_rss_mb"), get("trl_packing", "peak_rss_mb")),
        "gpu_mem_ratio_vs_trl_padding": ratio(get("tunelab", "peak_gpu_mb"), get("trl_padding", "peak_gpu_mb")),
        "cpu_s_throughput_ratio_vs_trl_padding": ratio(get("tunelab", "real_tokens_per_cpu_s"),
                                                       get("trl_padding", "real_tokens_per_cpu_s")),
        "cpu_s_throughput_ratio_vs_trl_packing": ratio(get("tunelab", "real_tokens_per_cpu_s"),
                                                       get("trl_packing", "real_tokens_per_cpu_s")),
    }
    for other in ("trl_packing", "trl_padding"):
        x, y = get("tunelab", "mean_loss_last5"), get(other, "mean_loss_last5")
        res[f"loss_delta_vs_{other}_last5"] = round(x - y, 4) if x is not None and y is not None else None
    # TRL's completion also labels the "\n" after <|im_end|> (one near-certain token per sample), which lowers its
    # per-token mean. With the same rows in the same order (both packing runs), the per-step loss ratio TRL/tunelab
    # should equal the label-count ratio tunelab/TRL if the two compute the same loss.
    a, b = get("tunelab", "losses"), get("trl_packing", "losses")
    la, lb = get("tunelab", "label_tokens_per_step"), get("trl_packing", "label_tokens_per_step")
    if a and b and la and lb and len(a) == len(b):
        per_step = [y / x for x, y in zip(a, b, strict=True) if x and y]
        res["loss_check_vs_trl_packing"] = {
            "per_step_loss_ratio_trl_over_tunelab": [round(r, 4) for r in per_step],
            "mean_per_step_loss_ratio": round(sum(per_step) / len(per_step), 4),
            "label_token_ratio_tunelab_over_trl": round(la / lb, 4),
        }
    res["targets"] = {
        "throughput_ratio_vs_trl_padding": {"min": TARGETS["throughput_vs_trl_padding"]},
        "throughput_ratio_vs_trl_packing": {"min": TARGETS["throughput_vs_trl_packing"]},
        "rss_ratio_vs_trl_padding": {"max": TARGETS["rss_vs_trl_padding"]},
    }
    for key, t in res["targets"].items():
        v = res[key]
        t["met"] = None if v is None else (v >= t["min"] if "min" in t else v <= t["max"])
    return res


def parent(a: argparse.Namespace) -> None:
    mbpp = Path(a.mbpp)
    sets = settings(a, mbpp, len(mbpp_chats(mbpp)))
    out_json = RESULTS / f"{a.tag}.json"
    runs: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    if a.merge and out_json.is_file():
        prev = json.loads(out_json.read_text())
        if prev.get("settings") != sets:
            raise SystemExit(f"{out_json}: was measured with other settings; --merge needs the same ones")
        runs = {k: v for k, v in prev["runs"].items() if k not in a.runs}
        history = prev.get("command_history", [{"command": prev.get("command"), "runs": list(prev["runs"])}])
        history = [{"command": h["command"], "runs": [r for r in h["runs"] if r not in a.runs]} for h in history]
    mdir = a.model_dir or model_dir()
    peak = matmul_peak_gflops(a.threads)  # measured here, on the same quiet machine, before the runs
    print(f"matmul peak: {peak} GFLOP/s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    argv = [rel(Path(sys.argv[0]).resolve()) if sys.argv[0].endswith(".py") else sys.argv[0], *sys.argv[1:]]
    command = "python " + " ".join(shlex.quote(x) for x in argv)
    common = ["--mbpp", str(mbpp), "--model-dir", mdir, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
              "--grad-accum", str(a.grad_accum), "--lr", str(a.lr), "--scheduler", a.scheduler, "--seed", str(a.seed),
              "--threads", str(a.threads), "--max-length", str(a.max_length),
              "--lora-dropout", str(a.lora_dropout), "--precision", a.precision,
              "--packed-batch-size", str(a.packed_batch_size or a.batch_size)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    with tempfile.TemporaryDirectory(prefix="tl-bench-") as td:
        for name in a.runs:
            out = Path(td) / f"{name}.json"
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            before = os.getloadavg()[0]
            loads: list[float] = []
            done = threading.Event()
            sampler = threading.Thread(target=_sample_load, args=(loads, done), daemon=True)
            sampler.start()
            busy0, child0 = _busy_cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", name,
                                   "--json-out", str(out), *common], env=env, cwd=td,
                                  stdout=None if a.verbose else subprocess.DEVNULL,
                                  stderr=None if a.verbose else subprocess.PIPE, text=True)
            if proc.returncode != 0:
                sys.stderr.write((proc.stderr or "")[-4000:])
                raise SystemExit(f"run {name} failed (exit {proc.returncode})")
            done.set()
            raw = json.loads(out.read_text())
            raw["parent_wall_s"] = time.perf_counter() - t0
            raw["loadavg_before"], raw["loadavg_after"] = before, os.getloadavg()[0]
            raw["loadavg_mean"] = round(sum(loads) / len(loads), 2) if loads else None
            child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            mine = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
            others = max(0.0, _busy_cpu_s() - busy0 - mine)
            # CPU the rest of the machine used meanwhile, in cores: 0 on a quiet machine
            raw["other_processes_cores"] = round(others / raw["parent_wall_s"], 2)
            runs[name] = summarize(raw, a.warmup_steps)
            r = runs[name]
            print(f"    {r['tokens_per_s']:.1f} real tok/s, {r['seconds_per_step']} s/step, peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"loss {r['final_loss']:.4f} (last-5 mean {r['mean_loss_last5']:.4f}), wall {r['process_wall_s']:.0f}s, "
                  f"other processes {r['other_processes_cores']} cores", flush=True)

    runs = {k: runs[k] for k in ALL_RUNS if k in runs}
    n_matmul = matmul_params(mdir)
    for r in runs.values():
        r["model_gflops_per_s"] = round(4 * n_matmul * r["tokens_per_s"] / 1e9, 2) if r["tokens_per_s"] else None
        peak_p = peak.get(a.precision)
        r["mfu"] = round(r["model_gflops_per_s"] / peak_p, 4) if peak_p and r["model_gflops_per_s"] else None
    history.append({"command": command, "runs": list(a.runs)})
    res = derived(runs)
    res.update({
        "command": command if len(history) == 1 else " && ".join(h["command"] for h in history if h["runs"]),
        "command_history": [h for h in history if h["runs"]],
        "machine": machine(), "versions": versions(), "settings": sets,
        "matmul_peak_gflops": peak, "model_matmul_params": n_matmul,
        "notes": (a.note or []) + [n for n in (json.loads(out_json.read_text()).get("notes", []) if a.merge and out_json.is_file() else []) if n not in (a.note or [])],
        "runs": runs,
    })
    out_json.write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / f"{a.tag}.md").write_text(markdown(res))
    print(markdown(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mbpp", default=str(DEFAULT_MBPP), help="mbpp.jsonl (default: <repo>/../shared/data/mbpp/mbpp.jsonl)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps excluded from the throughput")
    p.add_argument("--batch-size", type=int, default=4, help="samples per micro-batch in the padding runs")
    p.add_argument("--packed-batch-size", type=int, default=1,
                   help="packed rows per micro-batch in the packing runs; the default 1 row (~1,000 tokens, ~4.5 "
                   "samples) against --batch-size 4 compares about the same tokens and samples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--scheduler", choices=("cosine", "linear", "constant"), default="cosine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every run")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout in every run (tunelab's and peft's default 0)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 autocast over fp32 weights in every run (CPUs with AVX512-BF16/AMX)")
    p.add_argument("--runs", nargs="+", choices=ALL_RUNS, default=list(DEFAULT_RUNS))
    p.add_argument("--merge", action="store_true",
                   help="re-measure only --runs and keep the other runs of <tag>.json (same settings required), "
                   "e.g. to redo a run that other processes slowed down")
    p.add_argument("--tag", default="train_throughput", help="results file stem under benchmarks/results/")
    p.add_argument("--note", action="append", help="a note recorded with the results (repeatable)")
    p.add_argument("--verbose", action="store_true", help="show the children's output")
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.steps <= a.warmup_steps:
        p.error("--steps must exceed --warmup-steps")
    if a.child:
        run_child(a)
    else:
        parent(a)


if __name__ == "__main__":
    main()
