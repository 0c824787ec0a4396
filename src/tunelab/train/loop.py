"""THE training loop, on accelerate. Reads top to bottom:

accelerator -> run dir -> model -> method -> data -> optimizer/schedule -> (resume) -> eval before ->
for each step: accumulate micro-batches (loss normalised by the step's label count) -> clip -> step ->
log -> maybe validate/evaluate -> maybe checkpoint -> (signal: checkpoint and stop) -> final save -> report.

Many processes (DDP under torchrun / accelerate launch, see train/dist.py): every rank runs this same code.
An optimizer step takes `grad_accum * world` micro-batches from the one global order and each rank trains on
its share, so N processes see exactly the batches of one process with `grad_accum * N`. The step's label
count is summed over ranks and each rank's loss is scaled by N because DDP averages gradients: the update
equals the single-process one. The main process alone prepares the run dir, logs, validates, evaluates,
writes the final model and the report; a stop request on any rank stops all ranks at the same step.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.config import RunConfig
from tunelab.data import Batches, build_data
from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._base import count_params
from tunelab.models import load_model, load_tokenizer
from tunelab.models.attention import default_attention, enable_packed_attention, use_packed_attention
from tunelab.objectives import OBJECTIVES
from tunelab.train import checkpoint as ckpt
from tunelab.train import sharded, stability
from tunelab.train.dist import Dist, accelerator_kwargs, orphaned
from tunelab.train.engine import make_engine
from tunelab.train.optim import build_optimizer, build_scheduler
from tunelab.train.progress import TrainProgress
from tunelab.train.reference import AdapterOffReference
from tunelab.train.rollouts import Rollouts, no_rows_error
from tunelab.train.rundir import MetricsLog, prepare


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    interrupted: bool = False
    main: bool = True  # False on the other ranks of a multi-process run: they print nothing


class _StopFlag:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit. Second SIGINT: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (measured 1.7x faster LoRA steps than fp32 on such a CPU)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision() -> str:
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


def _accelerator(cfg: RunConfig, run_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps process-wide state; a second run in the same process (tests, sweeps) may use another
    # precision, so start from a clean slate (the distributed environment itself is kept)
    AcceleratorState._reset_state()
    GradientState._reset_state()

    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = auto_precision()
    trackers = (["tensorboard"] if cfg.train.tensorboard else []) + list(cfg.train.trackers)
    return Accelerator(mixed_precision=mp, log_with=trackers or None, project_dir=str(run_dir), **accelerator_kwargs())


@torch.no_grad()
def validation_loss(model: Any, objective: Any, batches: Batches | None, acc: Any = None, ref: Any = None) -> float | None:
    """Mean loss per loss item (token or unit) on the validation set, in the training precision (dropout off;
    RNG untouched)."""
    per_batch = validation_batches(model, objective, batches, acc, ref)
    return None if per_batch is None else sum(t for t, _ in per_batch) / max(sum(c for _, c in per_batch), 1)


VERDICT_UNITS = 500  # validation samples scored one by one for the before/after verdict (the first ones)


def validation_batches(model: Any, objective: Any, batches: Batches | None, acc: Any = None, ref: Any = None,
                       per_sample: bool = False) -> list[tuple[float, float]] | None:
    """(summed loss, loss items) per validation batch in a fixed order; with `per_sample`, per validation sample
    (each alone, unpadded; at most VERDICT_UNITS): the paired units of the before/after verdict."""
    if batches is None:
        return None
    was_training = model.training
    model.eval()
    out = []
    units = ([batches.batcher.collate([[u]], batches.pad_id, False) for u in batches.samples[:VERDICT_UNITS]]
             if per_sample else batches)
    for batch in units:
        batch = {k: v.to(model.device) for k, v in batch.items() if k != "real_tokens"}
        n = objective.num_items(batch)
        with acc.autocast() if acc is not None else nullcontext():
            loss, _ = objective.loss(model, batch, n, ref)
        out.append((loss.item() * float(n), float(n)))
    model.train(was_training)
    return out


def _eval_tasks(cfg: RunConfig, model: Any, tok: Any, run_dir: Path, label: str) -> dict[str, Any]:
    if not cfg.eval.tasks:
        return {}
    from tunelab.evaluate.runner import evaluate_tasks

    return evaluate_tasks(model, tok, cfg.eval.tasks, run_dir, label)


def _next_position(data: Batches, state: ckpt.LoopState) -> tuple[int, int]:
    """The next micro-batch's (epoch, index) in the global order; advances the data position."""
    if state.micro >= len(data):
        state.epoch, state.micro = state.epoch + 1, 0
    state.micro += 1
    return state.epoch, state.micro - 1


def _collate(data: Batches, position: tuple[int, int], order_cache: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    epoch, index = position
    if epoch not in order_cache:
        if len(order_cache) > 1:  # a step spans at most two epochs
            order_cache.pop(min(order_cache))
        order_cache[epoch] = data.order(epoch)
    return data.batch(epoch, index, order_cache[epoch])


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> RunResult:
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    acc = _accelerator(cfg, Path(cfg.out or "runs/run"))
    _check_engine(acc)
    dist = Dist.of(acc)
    out = Path(cfg.out or "runs/run")
    fresh = next((d for d in reversed([out, *out.parents]) if not d.exists()), out)  # the outermost dir this run makes
    run_dir, resuming = dist.from_main(lambda: prepare(cfg, resume, overwrite))
    try:
        return _train(cfg, acc, dist, run_dir, resuming, quiet or not dist.is_main)
    except Exception:
        # a failure while setting up (bad data, a method that does not fit, a crash) leaves no half-made run
        # behind that a rerun would refuse to overwrite (nor the parent dirs it made); a run with a checkpoint
        # is kept for --resume
        if dist.is_main and not resuming and not ckpt.list_checkpoints(run_dir / "checkpoints"):
            shutil.rmtree(fresh, ignore_errors=True)
        raise


def _train(cfg: RunConfig, acc: Any, dist: Dist, run_dir: Path, resuming: bool, quiet: bool) -> RunResult:
    tc = cfg.train
    torch.manual_seed(tc.seed)  # the same on every rank: every rank builds the same initial weights
    trackers = (["tensorboard"] if tc.tensorboard else []) + list(tc.trackers)
    if trackers:
        acc.init_trackers("tb", config={"run": str(run_dir)})  # accelerate writes from the main process only
    launcher = os.getppid() if dist.world > 1 else None

    method = METHODS.get(cfg.method.name)(cfg.method)  # type: ignore[attr-defined]
    objective = OBJECTIVES.get(cfg.objective.name)(cfg.objective)  # type: ignore[attr-defined]
    online = objective.online  # training rows drawn from the model during training (train/rollouts.py)
    dist.from_main(lambda: _check_sandbox(cfg, online))  # before any training: an evaluation refused later is refused now
    if online is not None:
        _check_online(cfg, method)
    # sharded: only the main process reads the weights; the others build a meta-device skeleton it fills later
    skeletons = tc.fsdp and dist.world > 1 and not objective.prepare_reads_weights
    with dist.main_first():  # the main process fills the caches (converted weights, tokenised data), then the rest read
        if skeletons and not dist.is_main:
            model, tok = None, load_tokenizer(cfg.model)
        else:
            model, tok = load_model(cfg.model, acc.device)
    if skeletons:
        config = dist.from_main(lambda: model.config)  # type: ignore[union-attr]
        model = model if dist.is_main else sharded.skeleton(cfg.model, config)
    # per-sample attention instead of a dense block mask (models/attention.py), checked once on the main process
    packed_cpu = cfg.data.packing and cfg.model.attn_implementation is None and acc.device.type == "cpu"
    if packed_cpu and dist.from_main(lambda: enable_packed_attention(model, quiet)) and not dist.is_main:
        use_packed_attention(model)
    engine = make_engine(tc.fsdp, acc, dist, lambda: METHODS.get(cfg.method.name)(cfg.method).tune(load_model(cfg.model, acc.device)[0]),  # type: ignore[attr-defined]
                         skeletons)
    if engine.sharded and method.calibration_batches:
        raise NotImplementedError(f"method '{cfg.method.name}' calibrates on data before tuning; train.fsdp does not rebuild that state for its gathered copy yet")  # type: ignore[attr-defined]
    if cfg.data.packing and not method.supports_packing:
        raise UserError(f"method '{cfg.method.name}' cannot train on packed rows; set data.packing=false")  # type: ignore[attr-defined]
    if tc.grad_accum > 1 and not objective.accumulation_invariant and not quiet:
        # not an error: the paper's estimator is per batch too; the user should know what grad_accum changes
        print(f"note: objective '{cfg.objective.name}' uses a per-micro-batch statistic, so train.grad_accum="  # type: ignore[attr-defined]
              f"{tc.grad_accum} is not the same as one batch {tc.grad_accum}x larger (see its docstring)", file=sys.stderr)
    with dist.main_first():
        data = build_data(cfg.data, tok, tc.batch_size, tc.seed, objective.batch_format, tc.batch_tokens, online=online is not None)
        ref = _precomputed_reference(cfg, method, objective, model, data, acc, quiet)  # base weights: before apply
        objective.prepare(_prepare_context(cfg, data, acc, quiet, model, objective, tok))
    rollouts = (Rollouts(objective, tok, cfg.data, run_dir, batch_size=tc.batch_size, batch_tokens=tc.batch_tokens, seed=tc.seed)
                if online is not None else None)
    micro_per_step = tc.grad_accum * dist.world
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * math.ceil(len(data.train) / micro_per_step)))  # type: ignore[arg-type]
    method.total_steps = total_steps
    if method.calibration_batches:
        method.prepare(model, _calibration(data, method.calibration_batches, acc.device))
    reinit = stability.reinit_top_layers(model, tc.reinit_top_layers) if tc.reinit_top_layers else []
    model = method.tune(model)
    model.train()
    if dist.rank:
        torch.manual_seed(tc.seed + dist.rank)  # the same weights everywhere, but each rank its own dropout
    stability.check_reinit_trains(model, reinit, cfg.method.name)  # type: ignore[attr-defined]
    if objective.needs_reference and ref is None:
        ref = AdapterOffReference(method, model)
    trainable, total = count_params(model)
    expected = method.expected_trainable(model)
    if expected is not None and expected != trainable:
        raise RuntimeError(f"method '{cfg.method.name}' trains {trainable:,} parameters but its formula says {expected:,}: a bug in the method")  # type: ignore[attr-defined]
    if not quiet:
        print(f"method {cfg.method.name}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.3f}%)", file=sys.stderr)  # type: ignore[attr-defined]
        if dist.world > 1:
            how = "sharded (FSDP2)" if engine.sharded else "replicated (DDP)"
            print(f"data parallel: {dist.world} processes ({acc.distributed_type.value}), weights {how}, "
                  f"{tc.grad_accum} micro-batch(es) of {f'<= {tc.batch_tokens} tokens' if tc.batch_tokens else f'{tc.batch_size} row(s)'} "
                  "each per step", file=sys.stderr)
    model = engine.before_optimizer(model)  # FSDP2 shards in place, so the optimizer must see the sharded parameters
    groups = method.param_groups(model, tc.lr, tc.weight_decay)
    if tc.layer_lr_decay is not None:
        groups = stability.layer_decay_groups(groups, model, tc.layer_lr_decay)
    optimizer = build_optimizer(groups, tc)
    scheduler = build_scheduler(optimizer, tc, total_steps)
    model, optimizer = engine.prepare(model, optimizer)

    state = ckpt.LoopState()
    ckpt_root = run_dir / "checkpoints"
    latest = ckpt.list_checkpoints(ckpt_root)[-1:] if resuming else []
    if latest:
        state = engine.load(latest[0], method, model, optimizer, scheduler)
    log = MetricsLog(run_dir / "metrics.jsonl", state.step if resuming else None, enabled=dist.is_main)
    plain = engine.plain(model)  # outside the DDP wrapper: the methods' hooks act on the tuned model itself
    if state.step == 0:
        before, state.extra["val_samples_before"] = engine.on_outputs(model, lambda m: (
            validation_batches(m, objective, data.valid, acc, ref),
            validation_batches(m, objective, data.valid, acc, ref, per_sample=True)))
        if cfg.eval.before:
            engine.on_whole_model(model, lambda m: _eval_tasks(cfg, m, tok, run_dir, "before"))
        state.val_loss_before = None if before is None else sum(t for t, _ in before) / max(sum(c for _, c in before), 1)
        if state.val_loss_before is not None:
            log.write({"step": 0, "val_loss": state.val_loss_before})

    progress = TrainProgress(total_steps, state.step, disabled=quiet)
    order_cache: dict[int, list[int]] = {}
    interrupted = False
    with _StopFlag() as stop, progress:
        while state.step < total_steps:
            if rollouts is not None and (data.train is None or state.step % rollouts.every == 0):
                data.train = _rollout_round(rollouts, engine, model, state, log)
                order_cache.clear()
            t0 = time.perf_counter()  # training time only: a round's sampling and judging is logged with the round
            positions = [_next_position(data.train, state) for _ in range(micro_per_step)]
            micro = [_collate(data.train, pos, order_cache) for pos in dist.shard(positions)]
            # the objective normalises by the whole step's loss items, over all ranks
            num_items = int(dist.sum([sum(objective.num_items(b) for b in micro)])[0])
            objective.on_step(state.step, total_steps)
            method.on_step(state.step, total_steps, plain, optimizer)
            loss_sum, real_tokens, step_metrics = 0.0, 0, []
            for i, batch in enumerate(micro):
                real_tokens += int(batch.pop("real_tokens", torch.tensor(0)))
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                ctx = acc.no_sync(model) if i < len(micro) - 1 else nullcontext()
                with ctx, acc.autocast():
                    loss, metrics = objective.loss(model, batch, num_items, ref)
                    acc.backward(loss * dist.world if dist.world > 1 else loss)  # DDP averages gradients over ranks
                loss_sum += loss.item()
                step_metrics.append(metrics)
            ranks = dist.gather((loss_sum, real_tokens, stop.requested or orphaned(launcher), step_metrics))
            loss_sum = sum(r[0] for r in ranks)  # each rank's loss is its share of the step's normalised sum
            real_tokens = sum(r[1] for r in ranks)
            stopping = any(r[2] for r in ranks)
            step_metrics = [m for r in ranks for m in r[3]]
            grad_norm = acc.clip_grad_norm_(model.parameters(), tc.max_grad_norm) if tc.max_grad_norm else None
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            method.after_step(state.step, plain)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            dt = time.perf_counter() - t0
            state.tokens += real_tokens
            state.wall_s += dt
            rec = {
                "step": state.step, "epoch": round(state.epoch + state.micro / len(data.train), 4), "loss": loss_sum,
                "lr": lr, "grad_norm": engine.grad_norm(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": real_tokens / dt, "tokens": state.tokens, "elapsed_s": round(state.wall_s, 3),
                "rss_mb": round(peak_rss_mb(), 1), **_mean_metrics(step_metrics),
            }
            if dist.world > 1:
                rec["world_size"] = dist.world
            if state.step % tc.log_every == 0 or state.step == total_steps:
                log.write(rec)
                acc.log({k: v for k, v in rec.items() if isinstance(v, int | float)}, step=state.step)
            progress.update(state.step, loss_sum, rec["tokens_per_s"])
            if tc.eval_every and state.step % tc.eval_every == 0 and state.step < total_steps:
                val = engine.on_outputs(model, lambda m: validation_loss(m, objective, data.valid, acc, ref))
                log.write({"step": state.step, "val_loss": val})
            if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < total_steps:
                engine.on_whole_model(model, lambda m: _eval_tasks(cfg, m, tok, run_dir, f"step-{state.step}"))
            if (tc.save_every and state.step % tc.save_every == 0) or stopping:
                engine.save(ckpt_root, method, model, optimizer, scheduler, state, tc.keep_last)
            if stopping and state.step < total_steps:
                interrupted = True
                break

    if interrupted:
        acc.end_training()
        return RunResult(run_dir, {"step": state.step, "total_steps": total_steps}, interrupted=True, main=dist.is_main)
    return _finish(cfg, acc, dist, engine, model, tok, method, objective, data, state, run_dir, log, (trainable, total), ref)


def _check_engine(acc: Any) -> None:
    """tunelab shards with its own FSDP2 path (train.fsdp, train/sharded.py) under a plain multi-process launch;
    accelerate's FSDP/DeepSpeed engines would wrap the model a second way, so a launch that selects them is refused."""
    kind = acc.distributed_type.value
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise NotImplementedError(
            f"accelerate launched with {kind}: tunelab shards the model itself; launch plain data parallel "
            "(configs/accelerate/ddp.yaml, or torchrun) and set train.fsdp=true to shard weights, gradients and "
            "optimizer state (FSDP2). DeepSpeed ZeRO is not supported")


def _check_sandbox(cfg: RunConfig, online: Any) -> None:
    from tunelab.evaluate.sandbox import allow_weak_isolation, check_isolation
    from tunelab.evaluate.tasks import TASKS

    if cfg.eval.allow_weak_sandbox:
        allow_weak_isolation()
    if online is not None or any(TASKS.get(t.name).executes_code for t in cfg.eval.tasks):  # type: ignore[attr-defined]
        check_isolation()


def _check_online(cfg: RunConfig, method: Any) -> None:
    """What an online run cannot do, refused before any work."""
    if not cfg.train.max_steps:
        raise UserError("objective.online: set train.max_steps (an online run has no fixed training set to count epochs over)")
    if method.calibration_batches:
        raise NotImplementedError(f"objective.online with method '{cfg.method.name}': the method calibrates on training batches before tuning, and an online run has none yet")  # type: ignore[attr-defined]


def _rollout_round(rollouts: Rollouts, engine: Any, model: Any, state: ckpt.LoopState, log: MetricsLog) -> Batches:
    """The batches of the round that step `state.step` belongs to: drawn now at a round's first step (or read back
    if a killed run already drew it), read back when resuming in the middle of a round."""
    r, start = rollouts.round_of(state.step), state.step % rollouts.every == 0
    if start:
        state.epoch, state.micro = 0, 0  # a round's micro-batches start at its first
    stats = engine.on_whole_model(model, lambda m: rollouts.draw(r, m, may_sample=start))
    if not stats["rows"]:
        raise no_rows_error(stats)
    if start:  # logged with the first step trained on it, so a resume from this step redoes the line
        log.write({"step": state.step + 1, **{f"rollout/{k}": v for k, v in stats.items() if k != "reused"}})
    return rollouts.batches(r)


def _calibration(data: Any, n: int, device: Any) -> list[dict[str, torch.Tensor]]:
    """The first n micro-batches of epoch 0 in training order (reading them draws no random numbers)."""
    order = data.train.order(0)
    n = min(n, len(data.train))
    return [{k: v.to(device) for k, v in data.train.batch(0, i, order).items() if k in ("input_ids", "attention_mask", "position_ids")}
            for i in range(n)]


def _mean_metrics(per_micro: list[dict[str, float]]) -> dict[str, float]:
    """An objective's metrics averaged over the step's micro-batches (a key absent from one is averaged over the rest)."""
    keys = dict.fromkeys(k for m in per_micro for k in m if k != "tokens")
    return {k: sum(vals) / len(vals) for k in keys if (vals := [m[k] for m in per_micro if k in m])}


def _precomputed_reference(cfg: RunConfig, method: Any, objective: Any, model: Any, data: Any, acc: Any, quiet: bool) -> Any:
    """Reference log-probs precomputed with the base weights, when the objective needs them and the run
    does not use the adapter-off reference (see train/reference.py)."""
    if not objective.needs_reference:
        return None
    choice = cfg.train.reference
    if choice == "auto":
        choice = "adapter" if method.can_disable else "precomputed"
    if choice == "adapter":
        if not method.can_disable:
            raise UserError(f"train.reference=adapter: method '{cfg.method.name}' cannot switch itself off; use precomputed or auto")  # type: ignore[attr-defined]
        return None
    if objective.online is not None:
        why = "train.reference=precomputed" if method.can_disable else f"method '{cfg.method.name}' cannot switch itself off"  # type: ignore[attr-defined]
        raise UserError(f"objective.online needs the adapter-off reference (train.reference adapter or auto, with a method that can "
                        f"switch itself off such as lora), but {why}: the reference log-probs of rows drawn during training "
                        "cannot be precomputed")
    from tunelab.models.presets import cache_dir
    from tunelab.train.reference import cache_key, precompute

    units = data.train.samples + (data.valid.samples if data.valid else [])
    key = cache_key(units, cfg.model.model_dump(mode="json"), str(acc.mixed_precision))
    bar = _RefProgress(quiet)
    with bar:
        return precompute(
            model, units, data.train.batcher, data.train.pad_id, cache_dir() / "reference" / key,
            batch_size=cfg.train.batch_size, autocast=acc.autocast, progress=bar.update,
        )


def _prepare_context(cfg: RunConfig, data: Any, acc: Any, quiet: bool, model: Any, objective: Any, tok: Any) -> Any:
    from tunelab.data.batching import get_batcher
    from tunelab.models.presets import cache_dir
    from tunelab.objectives._base import PrepareContext

    # an online run has no training set yet (its rows are drawn during training): only validation units, if any
    units = (data.train.samples if data.train else []) + (data.valid.samples if data.valid else [])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return PrepareContext(units, get_batcher(objective.batch_format), pad, acc.device, acc.autocast, cfg.train.batch_size,
                          cache_dir() / "objectives", quiet, model)


class _RefProgress:
    def __init__(self, quiet: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("[bold]reference log-probs"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=quiet)
        self.task = self.p.add_task("ref", total=None)

    def update(self, done: int, total: int) -> None:
        self.p.update(self.task, completed=done, total=total)

    def __enter__(self) -> _RefProgress:
        self.p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.p.__exit__(*exc)


def _finish(cfg, acc, dist, engine, model, tok, method, objective, data, state, run_dir, log, params, ref=None) -> RunResult:  # noqa: ANN001
    def deliver(whole: torch.nn.Module) -> dict[str, Any]:
        whole = method.finalize(whole)
        default_attention(whole)  # the saved config names an implementation any transformers can load
        return _deliver(cfg, acc, whole, tok, method, objective, data, state, run_dir, log, params, ref)

    summary = engine.on_whole_model(model, deliver)
    acc.end_training()
    return RunResult(run_dir, summary, main=dist.is_main)


def _deliver(cfg, acc, model, tok, method, objective, data, state, run_dir, log, params, ref) -> dict[str, Any]:  # noqa: ANN001
    """Main process: final validation, the final model, evaluation after, summary, verdicts, report."""
    after = validation_batches(model, objective, data.valid, acc, ref)
    val_after = None if after is None else sum(t for t, _ in after) / max(sum(c for _, c in after), 1)
    if val_after is not None:
        log.write({"step": state.step, "val_loss": val_after})
    unwrapped = acc.unwrap_model(model)
    final = run_dir / "final"
    tmp = run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    method.save_final(unwrapped, tmp)
    tok.save_pretrained(tmp)
    (tmp / "tunelab.json").write_text(json.dumps({"method": cfg.method.name, "model": cfg.model.model_dump(), "saved_format": method.saved_format}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if cfg.eval.after:
        _eval_tasks(cfg, unwrapped, tok, run_dir, "after")
    summary = {
        "trainable_params": params[0], "total_params": params[1], "steps": state.step,
        "train_tokens": state.tokens, "wall_s": round(state.wall_s, 2),
        "tokens_per_s": state.tokens / state.wall_s if state.wall_s else None,
        "val_loss_before": state.val_loss_before, "val_loss_after": val_after,
        "val_samples_before": state.extra.get("val_samples_before"),
        "val_samples_after": validation_batches(model, objective, data.valid, acc, ref, per_sample=True),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "final_dir": str(final), "data": data.stats,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    from tunelab.evaluate.verdict import run_verdicts

    summary["verdicts"] = run_verdicts(run_dir)  # from the files just written: the same numbers as any later reader
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    from tunelab.report import write_report

    write_report(run_dir)
    return summary
