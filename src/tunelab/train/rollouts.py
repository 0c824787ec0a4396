"""Training rows drawn from the model being tuned, during training (objectives with `online` set; see
objectives/_online.py for the papers).

Round r covers optimizer steps [r * every, (r + 1) * every). At its first step the main process samples the
round's problems with the weights of that moment (the task's sampling settings, seed = task seed + r), judges
every sample in the sandbox, and the objective turns the judged samples into rows of its format (DPO: passing
sample = chosen, failing = rejected). The round lives in `run_dir/rollouts/round-NNNNN/`: the evaluation
runner's samples.jsonl and summary.json, then rows.jsonl and stats.json, written last and atomically (their
presence marks the round complete). Every rank reads rows.jsonl and trains on it with the objective's batcher;
a round's micro-batches are (epoch, index) positions in it like a static dataset's (an epoch reshuffles when
the round needs more micro-batches than it has rows), so a checkpoint's loop position resumes mid-round
exactly: resume reads the round's rows instead of sampling again (the weights that drew them are gone).

Problems come in a seeded permutation of the task's list, `problems_per_round` at a time; a pass over the
list ends with a smaller round, and the next pass uses a new permutation. Generation runs on the main process
only (other ranks wait), with the whole model (gathered under FSDP).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from tunelab.data import Batches, tokenize
from tunelab.data.batching import get_batcher
from tunelab.errors import UserError
from tunelab.evaluate.tasks._base import Problem, Task


class Rollouts:
    def __init__(self, objective: Any, tok: Any, data_cfg: Any, run_dir: Path, *, batch_size: int,
                 batch_tokens: int | None, seed: int) -> None:
        from tunelab.data.templating import has_chat_template
        from tunelab.evaluate.tasks import TASKS

        self.objective, self.spec, self.tok, self.data_cfg = objective, objective.online, tok, data_cfg
        self.dir = run_dir / "rollouts"
        self.batch_size, self.batch_tokens, self.seed = batch_size, batch_tokens, seed
        self.every = self.spec.every
        self._chat = has_chat_template(tok)
        self.task = TASKS.get(self.spec.task.name)(self.spec.task, chat_template=self._chat)
        self.problems = self.task.problems()
        if not self.problems:
            raise UserError("objective.online.task: no problems (check its limit/skip/split/path)")

    def round_of(self, step: int) -> int:
        return step // self.every

    def problems_for(self, r: int) -> list[Problem]:
        """Round r's problems: a slice of this pass's seeded permutation (passes never mix within a round)."""
        n = len(self.problems)
        k = min(self.spec.problems_per_round, n)
        per_pass = math.ceil(n / k)
        p, i = divmod(r, per_pass)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + p)).tolist()
        return [self.problems[j] for j in perm[i * k : (i + 1) * k]]

    def round_dir(self, r: int) -> Path:
        return self.dir / f"round-{r:05d}"

    def draw(self, r: int, model: Any, *, may_sample: bool) -> dict[str, Any]:
        """Main process: round r's rows, sampled now with `model` unless the round is already on disk (a resume).
        Returns the round's stats (`rows`: how many training rows it gave)."""
        out = self.round_dir(r)
        if (out / "stats.json").is_file() and (out / "rows.jsonl").is_file():
            return {**json.loads((out / "stats.json").read_text()), "reused": True}
        if not may_sample:
            raise RuntimeError(f"{out}: the rollouts of round {r} are missing, so the run cannot resume in the middle of "
                               "that round (the weights that drew them are gone); resume from a checkpoint at a round start")
        from tunelab.evaluate.runner import run_task
        from tunelab.evaluate.tasks import TASKS
        from tunelab.generate.engine import Engine

        cfg = self.spec.task.model_copy(update={"seed": self.spec.task.seed + r})
        task: Task = TASKS.get(cfg.name)(cfg, chat_template=self._chat)  # type: ignore[attr-defined]
        problems = self.problems_for(r)
        engine = Engine(model, self.tok, batch_size=self.spec.batch_size, backend="hf")
        summary = run_task(engine, task, out, label=f"round-{r}", quiet=True, problems=problems)
        samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines() if ln.strip()]
        rows, counts = self.objective.rollout_rows(task, problems, samples)
        stats = {"round": r, "problems": len(problems), "samples": len(samples),
                 "sample_pass_rate": sum(s["passed"] for s in samples) / max(len(samples), 1),
                 "sandbox_errors": summary["status_counts"].get("sandbox_error", 0), "rows": len(rows), **counts,
                 "wall_s": summary["wall_s"]}
        _atomic(out / "rows.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        _atomic(out / "stats.json", json.dumps(stats, indent=2))
        return stats

    def batches(self, r: int) -> Batches:
        """Round r's rows, tokenised and batched like a training set (every rank)."""
        units = tokenize(str(self.round_dir(r) / "rows.jsonl"), self.tok, self.data_cfg, "train", self.objective.batch_format).samples
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        return Batches(units, self.batch_size, self.data_cfg.max_length, self.data_cfg.packing, pad, self.seed + r,
                       batcher=get_batcher(self.objective.batch_format), batch_tokens=self.batch_tokens)


def no_rows_error(stats: dict[str, Any]) -> UserError:
    detail = ", ".join(f"{k} {v}" for k, v in stats.items() if k not in ("round", "rows", "reused"))
    return UserError(f"objective.online: round {stats['round']} gave no training rows ({detail}); sample more "
                     "(task n_samples, temperature), raise problems_per_round, or keep reference_chosen on")


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
