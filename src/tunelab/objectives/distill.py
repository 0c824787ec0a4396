"""FIRST, top-k offline distillation (Shum et al., "FIRST: Teach A Reliable Large Language Model Through
Efficient Trustworthy Distillation", arXiv 2408.12168): SFT data and a fine-tuned teacher run once over it,
keeping only the top-k token ids and log-probs of every labelled position; the student learns by forward
KL(teacher || student) over those k tokens (plus an optional "other tokens" bucket).

Loss: for a labelled position with teacher top-k ids i_1..i_k, the buckets are q = (p(i_1), .., p(i_k)) and,
with `other_token`, q_{k+1} = 1 - sum_j p(i_j), for the teacher (its stored probabilities) and the student
(its probabilities gathered at the teacher's ids; its "other" mass is the logsumexp of its log-probs outside
the top-k, exact and free of the 1 - sum cancellation). Both are re-shaped the same way ("trustworthy
maximisation"): `linear`: q~ = (q + 1e-6) / sum(q + 1e-6); `softmax`: q~ = softmax(log q / T), with
T = `teacher_temperature` for the teacher and `student_temperature` for the student (temperatures act only
through this softmax, as in the reference code; linear rejects T != 1). Then
L = sum_t sum_b q~T_tb (log q~T_tb - log q~S_tb) / N, N = label tokens of the whole optimizer step (exact
gradient accumulation), plus `ce_weight` * the SFT loss when > 0. Defaults (reference `example_run.sh`,
METHODS.md B10): top_k 5, linear norm, other bucket on, temperatures 1, no hard-label CE.
The table is built in `prepare` (teacher in fp32, eval mode, under the run's autocast; log_softmax over the
full vocabulary in fp32; ids int32, log-probs float32) and cached on disk in atomic shards of 64 units,
keyed by the teacher (name, and for a local path its files' sizes and mtimes), k, precision and the exact
token ids and labels, so a killed pass resumes and a resumed run loads no teacher. Deviations: the paper
picks the teacher-side normalisation/temperature by calibration error (ECE) on validation data (criterion
UNCONFIRMED in the code); we expose it as config, not a search. The reference code, with the other bucket
on, skips normalisation and feeds raw probabilities where kl_div expects log-probs; we normalise the k+1
buckets as configured and take a true KL. The reference sums KL over tokens and divides by the number of
sequences; we divide by label tokens (like SFT here). Teacher and student must share the tokenizer: only
the vocabulary size can be checked (in `loss`); no label smoothing (off in the reference run). Without a
`teacher`, the base model (before the method is applied) is its own teacher: self-distillation toward its own
top-k, keyed by a fingerprint of its weights; FIRST's setting is a larger fine-tuned teacher of the same family.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.errors import UserError
from tunelab.objectives import OBJECTIVES
from tunelab.objectives._base import Batch, Objective, PrepareContext
from tunelab.objectives._logprobs import label_logits
from tunelab.objectives.sft import sft_loss

if TYPE_CHECKING:
    from tunelab.train.reference import Reference

SHARD = 64  # units per cache shard: the most a killed teacher pass can cost
EPS = 1e-6  # the reference's norm_epsilon for the linear normalisation
_ROWS = 2048  # labelled positions per fp32 log_softmax block in the teacher pass

Table = dict[int, tuple[torch.Tensor, torch.Tensor]]  # sid -> (ids int32 [n, k], log-probs float32 [n, k])


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["distill"] = "distill"
    teacher: str | None = Field(None, description="teacher model: a preset, local HF dir, .gguf or hub id (same tokenizer as the student); "
                                "unset: the base model itself (self-distillation toward its own top-k)")
    top_k: int = Field(5, ge=1, description="teacher tokens kept per labelled position")
    norm: Literal["linear", "softmax"] = Field("linear", description="re-shaping of the top-k buckets: linear (+1e-6, renormalise) or softmax(log q / T)")
    teacher_temperature: float = Field(1.0, gt=0, description="teacher temperature of the softmax norm")
    student_temperature: float = Field(1.0, gt=0, description="student temperature of the softmax norm")
    other_token: bool = Field(True, description="keep an explicit 'other tokens' bucket 1 - sum(top-k) for teacher and student")
    ce_weight: float = Field(0.0, ge=0, description="weight of an added hard-label SFT loss (0: pure distillation)")

    @model_validator(mode="after")
    def _temps_need_softmax(self) -> DistillConfig:
        if self.norm == "linear" and (self.teacher_temperature != 1.0 or self.student_temperature != 1.0):
            raise ValueError("teacher_temperature/student_temperature act only with norm=softmax; set norm: softmax or leave them at 1")
        return self


def _reshape(logq: torch.Tensor, norm: str, temperature: float) -> torch.Tensor:
    """Normalised bucket log-probs from bucket log-masses logq [N, B]."""
    if norm == "linear":
        q = logq.exp() + EPS
        return (q / q.sum(-1, keepdim=True)).log()
    return torch.log_softmax(logq / temperature, dim=-1)


def first_kl(
    student_logprobs_full: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, *,
    norm: str, teacher_temperature: float, student_temperature: float, other_token: bool,
) -> torch.Tensor:
    """Per-position forward KL(teacher || student) [N] over the teacher's top-k buckets (+ the other bucket).

    student_logprobs_full [N, V]: the student's log-probs over the full vocabulary; teacher_ids [N, k] and
    teacher_logprobs [N, k]: the teacher's top-k ids and full-vocabulary log-probs."""
    ids = teacher_ids.long()
    t_log = teacher_logprobs.float()
    s_log = student_logprobs_full.gather(-1, ids)
    if other_token:
        t_other = torch.log((1.0 - t_log.exp().sum(-1, keepdim=True)).clamp(min=0.0))
        s_other = student_logprobs_full.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
        t_log, s_log = torch.cat([t_log, t_other], -1), torch.cat([s_log, s_other], -1)
    t = _reshape(t_log, norm, teacher_temperature)
    s = _reshape(s_log, norm, student_temperature)
    p = t.exp()
    return torch.where(p > 0, p * (t - s), torch.zeros_like(p)).sum(-1)


def _fingerprint(name: str) -> list[Any]:
    """A local teacher's files (name, size, mtime), so a re-export at the same path is not a cache hit."""
    p = Path(name).expanduser()
    # a directory's files at any depth (weights may sit in a subfolder), named relative to it
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    stats = [(str(f.relative_to(p)) if f != p else f.name, f.stat()) for f in files]
    return [[n, st.st_size, st.st_mtime_ns] for n, st in stats]


def _precision(ctx: PrepareContext) -> str:
    kind = torch.device(ctx.device).type
    with ctx.autocast():
        on = torch.is_autocast_enabled(kind)
        return f"{kind}:{torch.get_autocast_dtype(kind) if on else 'off'}"


def _cache_dir(cfg: DistillConfig, ctx: PrepareContext) -> Path:
    from tunelab.train.reference import cache_key

    if cfg.teacher:
        who: dict[str, Any] = {"teacher": cfg.teacher, "files": _fingerprint(str(cfg.teacher))}
    else:  # self-distillation: the base model's own weights identify the teacher
        who = {"teacher": None, "weights": _weights_fingerprint(ctx.model)}
    teacher = {**who, "top_k": cfg.top_k, "dtype": "float32"}
    return Path(ctx.cache_dir) / "distill" / cache_key(ctx.units, teacher, _precision(ctx))


@torch.no_grad()
def _weights_fingerprint(model: Any) -> list[float]:
    """Per-tensor sums in float64: cheap, and different for any base model a user would swap in."""
    return [round(float(p.detach().double().sum()), 6) for p in model.parameters()]


@torch.no_grad()
def _topk_table(teacher: Any, units: list[Any], ctx: PrepareContext, k: int) -> Table:
    """Top-k ids and log-probs of every labelled position of `units`, in labelled-position order."""
    out: Table = {}
    for i in range(0, len(units), ctx.batch_size):
        chunk = units[i : i + ctx.batch_size]
        batch = {key: v.to(ctx.device) for key, v in ctx.batcher.collate([[u] for u in chunk], ctx.pad_id, packed=False).items()}
        with ctx.autocast():
            logits, _ = label_logits(teacher, batch)
        ids, lps = [], []
        for r in range(0, logits.shape[0], _ROWS):
            lp = torch.log_softmax(logits[r : r + _ROWS].float(), dim=-1)
            top = lp.topk(k, dim=-1)
            ids.append(top.indices.to(torch.int32).cpu())
            lps.append(top.values.cpu())
        all_ids = torch.cat(ids) if ids else torch.zeros(0, k, dtype=torch.int32)
        all_lps = torch.cat(lps) if lps else torch.zeros(0, k)
        per_row = (batch["labels"] != -100).sum(1).tolist()  # one row per sequence, sequences unit by unit
        start, row = 0, 0
        for u in chunk:
            n = sum(per_row[row : row + len(u.seqs)])
            row += len(u.seqs)
            out[u.sid] = (all_ids[start : start + n].clone(), all_lps[start : start + n].clone())
            start += n
    return out


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    if path.suffix == ".pt":
        torch.save(obj, tmp)
    else:
        tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class _Bar:
    def __init__(self, quiet: bool, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("[bold]teacher top-k"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=quiet)
        self.task = self.p.add_task("teacher", total=total)

    def __enter__(self) -> _Bar:
        self.p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.p.__exit__(*exc)


@OBJECTIVES.register("distill")
class Distill(Objective):
    Config = DistillConfig
    batch_format = "sft"
    loss_items = "tokens"

    def __init__(self, cfg: BaseModel) -> None:
        super().__init__(cfg)
        self.table: Table | None = None
        self.vocab_size: int | None = None

    @property
    def prepare_reads_weights(self) -> bool:
        return not self.cfg.teacher  # type: ignore[attr-defined]  # self-distillation: the base is the teacher

    def _teacher_name(self) -> str:
        return self.cfg.teacher or "the base model (self-distillation)"  # type: ignore[attr-defined]

    def prepare(self, ctx: PrepareContext) -> None:
        cfg: DistillConfig = self.cfg  # type: ignore[assignment]
        name = self._teacher_name()
        if not cfg.teacher and ctx.model is None:
            raise UserError("objective.teacher is not set and there is no base model to self-distil from: name the teacher model")
        if len({u.sid for u in ctx.units}) != len(ctx.units):
            raise RuntimeError("distill: sample ids of the prepared units are not unique (the teacher table is keyed by them)")
        cache = _cache_dir(cfg, ctx)
        cache.mkdir(parents=True, exist_ok=True)
        shards = [ctx.units[i : i + SHARD] for i in range(0, len(ctx.units), SHARD)]
        paths = [cache / f"part-{j:05d}.pt" for j in range(len(shards))]
        meta = cache / "meta.json"
        teacher = None
        if not meta.is_file() or not all(p.is_file() for p in paths):
            teacher = self._load_teacher(name, ctx)
            _atomic_save({"teacher": name, "top_k": cfg.top_k, "vocab_size": self.vocab_size}, meta)
        self.vocab_size = int(json.loads(meta.read_text())["vocab_size"])
        table: Table = {}
        was_training = ctx.model.training if ctx.model is not None else False
        if teacher is not None:
            teacher.eval()
        with _Bar(ctx.quiet, len(ctx.units)) as bar:
            for shard, path in zip(shards, paths, strict=True):
                if path.is_file():
                    part = torch.load(path, weights_only=True)
                else:
                    part = _topk_table(teacher, shard, ctx, cfg.top_k)
                    _atomic_save(part, path)
                table.update(part)
                bar.p.update(bar.task, completed=len(table))
        self.table = table
        if ctx.model is not None:
            ctx.model.train(was_training)
        if teacher is not None:
            del teacher  # the base model itself (self-distillation) stays alive: the run still holds it
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _load_teacher(self, name: str, ctx: PrepareContext) -> Any:
        import tunelab.models as models
        from tunelab.config import ModelConfig

        if not self.cfg.teacher:  # type: ignore[attr-defined]
            out = ctx.model.get_output_embeddings()
            self.vocab_size = int(out.weight.shape[0] if out is not None else ctx.model.config.vocab_size)
            return ctx.model  # prepare() puts it in eval mode for the pass and restores its mode after

        teacher, _ = models.load_model(ModelConfig(name=name, dtype="float32"), ctx.device)
        teacher.eval().requires_grad_(False)
        out = teacher.get_output_embeddings()
        self.vocab_size = int(out.weight.shape[0] if out is not None else teacher.config.vocab_size)
        return teacher

    def _rows(self, batch: Batch, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.table is None:
            raise RuntimeError("distill: prepare() must run before loss() (it builds the teacher's top-k table)")
        rows = []
        for s in batch["sample_ids"].tolist():
            if s not in self.table:
                raise RuntimeError(f"distill: sample id {s} has no teacher table row: prepare() saw other data")
            rows.append(self.table[s])
        ids = torch.cat([r[0] for r in rows]).to(device, torch.long)
        return ids, torch.cat([r[1] for r in rows]).to(device, torch.float32)

    def loss(self, model: Any, batch: Batch, num_items: int, ref: Reference | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg: DistillConfig = self.cfg  # type: ignore[assignment]
        t_ids, t_lp = self._rows(batch, batch["input_ids"].device)
        logits, labels = label_logits(model, batch)
        if logits.shape[-1] != self.vocab_size:
            raise UserError(
                f"the teacher ({self._teacher_name()}) has a vocabulary of {self.vocab_size} tokens but the student's has "
                f"{logits.shape[-1]}: distillation needs the same tokenizer for teacher and student"
            )
        if t_ids.shape[0] != labels.shape[0]:
            raise RuntimeError(f"distill: {t_ids.shape[0]} teacher rows for {labels.shape[0]} labelled positions (stale table?)")
        lp = torch.log_softmax(logits.float(), dim=-1)
        kl = first_kl(lp, t_ids, t_lp, norm=cfg.norm, teacher_temperature=cfg.teacher_temperature,
                      student_temperature=cfg.student_temperature, other_token=cfg.other_token)
        loss = kl.sum() / max(num_items, 1)
        if cfg.ce_weight > 0:
            loss = loss + cfg.ce_weight * sft_loss(logits, labels, num_items)
        n = max(labels.numel(), 1)
        metrics = {
            "kl": float(kl.detach().sum()) / n,
            "teacher_topk_mass": float(t_lp.exp().sum(-1).sum()) / n,
            "nll": float(-lp.detach().gather(-1, labels[:, None]).sum()) / n,
            "tokens": float(labels.numel()),
        }
        return loss, metrics
