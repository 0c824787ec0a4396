"""`tunelab compare GRID.yaml`: the same data, steps, seed and evaluation for a list of methods (and objectives).

GRID.yaml:

    base: {model: ..., data: ..., objective: ..., train: ..., eval: ...}   # one run config shared by every cell
    cells:                                                                  # each overrides sections of base
      - {label: lora, method: {name: lora, r: 8}}
      - {label: bitfit-1e-3, method: {name: bitfit, add_biases: true}, train: {lr: 1.0e-3}}
    out: runs/compare/methods        # default runs/compare/<grid file stem>

Each cell is an ordinary run in OUT/cells/<label>, trained in its own process (so peak memory is the cell's, and
a crash cannot take the grid down). The grid is resumable: a finished cell is not rerun, an interrupted one resumes
from its checkpoint, a failed one is recorded with its error and the grid goes on. The base model is evaluated
once (OUT/base) and every cell's score is compared with it problem by problem (exact McNemar test, paired
bootstrap CI). Writes OUT/compare.json, OUT/compare.md and OUT/compare.png (score vs trainable parameters).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.config import apply_override, read_yaml, validate
from tunelab.errors import UserError

M = TypeVar("M", bound=BaseModel)
_SECTIONS = ("model", "data", "method", "objective", "train", "eval")


class Cell(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = Field(..., description="the cell's name (its run directory)")
    model: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    method: dict[str, Any] | None = None
    objective: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None


class Grid(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: dict[str, Any] = Field(default_factory=dict, description="the run config every cell starts from")
    cells: list[Cell]
    out: str | None = None


def read_model(path: Path, cls: type[M]) -> M:
    """A YAML file validated as `cls`: one-line error naming the file and the key."""
    try:
        return cls.model_validate(read_yaml(path))
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"{path}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


def load_grid(path: Path) -> tuple[Grid, Path]:
    grid = read_model(path, Grid)
    if not grid.cells:
        raise UserError(f"{path}: cells: the grid has no cells")
    labels = [c.label for c in grid.cells]
    for label in labels:
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", label):
            raise UserError(f"{path}: cell label '{label}' must be a plain name (letters, digits, _ . + -)")
    if len(set(labels)) != len(labels):
        raise UserError(f"{path}: cell labels must be unique ({sorted({x for x in labels if labels.count(x) > 1})} repeat)")
    return grid, Path(grid.out or Path("runs") / "compare" / path.stem)


def cell_config(grid: Grid, cell: Cell, out: Path) -> dict[str, Any]:
    """base with the cell's sections merged in (a section with a different `name` replaces base's)."""
    cfg = copy.deepcopy(grid.base)
    for key in _SECTIONS:
        over = getattr(cell, key)
        if over is None:
            continue
        old = cfg.get(key) or {}
        replace = isinstance(old, dict) and "name" in over and old.get("name") not in (None, over["name"])
        cfg[key] = dict(over) if replace or not isinstance(old, dict) else {**old, **over}
    cfg.setdefault("eval", {})["before"] = False  # the base is evaluated once for the whole grid
    cfg["out"] = str(out / "cells" / cell.label)
    cfg.pop("name", None)
    try:
        validate(copy.deepcopy(cfg), f"cell '{cell.label}'")
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith("cell '") else f"cell '{cell.label}': {msg}") from None
    return cfg


def run_grid(path: Path, quiet: bool = False, overrides: list[str] | None = None) -> Path:
    grid, out = load_grid(path)
    for item in overrides or []:  # `key.sub=value` on the shared base config (e.g. train.max_steps=10)
        apply_override(grid.base, item)
    out.mkdir(parents=True, exist_ok=True)
    configs = {c.label: cell_config(grid, c, out) for c in grid.cells}  # every cell valid before any trains
    base_eval = _base_eval(grid, configs[grid.cells[0].label], out, quiet)
    records = []
    for cell in grid.cells:
        rec = _run_cell(cell.label, configs[cell.label], out, quiet)
        if rec.get("status") == "interrupted":
            raise KeyboardInterrupt
        records.append(rec)
        _write(out, records, base_eval)  # partial results are readable while the grid runs
    return out


def _base_eval(grid: Grid, cfg: dict[str, Any], out: Path, quiet: bool) -> dict[str, dict[str, Any]]:
    """The base model's evaluation on the grid's tasks (once; reused on rerun)."""
    tasks = (cfg.get("eval") or {}).get("tasks") or []
    if not tasks:
        return {}
    base_dir = out / "base"
    done = base_dir / "done.json"
    if not done.is_file():
        from tunelab.config import ModelConfig
        from tunelab.evaluate.runner import evaluate_tasks
        from tunelab.models import load_model

        model, tok = load_model(ModelConfig(**(cfg.get("model") or {})), "cuda" if _cuda() else "cpu")
        summaries = evaluate_tasks(model, tok, tasks, base_dir, "before", quiet=quiet)
        done.write_text(json.dumps(summaries))
        del model
    return json.loads(done.read_text())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_cell(label: str, cfg: dict[str, Any], out: Path, quiet: bool) -> dict[str, Any]:
    run = Path(cfg["out"])
    rec: dict[str, Any] = {"label": label, "method": cfg.get("method"), "objective": cfg.get("objective"), "run": str(run)}
    if (run / "summary.json").is_file() and (run / "final" / "tunelab.json").is_file():
        return {**rec, "status": "done", **_cell_results(run)}
    cfg_file = out / "configs" / f"{label}.yaml"
    cfg_file.parent.mkdir(exist_ok=True)
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    resume = (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step-*"))
    # a cell that died before its first checkpoint starts again
    flag = ["--resume"] if resume else ["--overwrite"] if run.exists() else []
    cmd = [sys.executable, "-m", "tunelab.cli", "train", str(cfg_file), *flag, "--quiet"]
    if not quiet:
        print(f"[compare] cell {label}: {'resuming' if resume else 'training'} ({run})", file=sys.stderr, flush=True)
    log = out / "logs" / f"{label}.log"
    log.parent.mkdir(exist_ok=True)
    with log.open("a") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode == 130 or proc.returncode < 0:
        return {**rec, "status": "interrupted"}
    if proc.returncode != 0:
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        error = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "no output")
        if not quiet:
            print(f"[compare] cell {label} failed (exit {proc.returncode}): {error}", file=sys.stderr, flush=True)
        return {**rec, "status": "failed", "exit_code": proc.returncode, "error": error, "log": str(log)}
    return {**rec, "status": "done", **_cell_results(run)}


def _cell_results(run: Path) -> dict[str, Any]:
    s = json.loads((run / "summary.json").read_text())
    evals = {}
    for f in sorted((run / "eval").glob("*/after/summary.json")):
        evals[f.parent.parent.name] = json.loads(f.read_text())
    keep = ("trainable_params", "total_params", "steps", "wall_s", "tokens_per_s", "peak_rss_mb", "val_loss_before",
            "val_loss_after", "peak_gpu_mb")
    return {**{k: s.get(k) for k in keep}, "eval": evals}


def _write(out: Path, records: list[dict[str, Any]], base_eval: dict[str, dict[str, Any]]) -> None:
    from tunelab.evaluate.stats import compare_pass, passed_per_problem

    rows = []
    for rec in records:
        row = {k: v for k, v in rec.items() if k != "eval"}
        row["scores"] = {}
        for task, summ in (rec.get("eval") or {}).items():
            score = {"after": summ.get("metrics", {})}
            if task in base_eval:
                paired = compare_pass(passed_per_problem(base_eval[task]), passed_per_problem(summ))
                score["vs_base"] = paired.as_dict()
            row["scores"][task] = score
        rows.append(row)
    base = {t: s.get("metrics", {}) for t, s in base_eval.items()}
    (out / "compare.json").write_text(json.dumps({"base": base, "cells": rows}, indent=2))
    (out / "compare.md").write_text(render_markdown(rows, base))
    _plot(out / "compare.png", rows, base)


def _score(row: dict[str, Any]) -> tuple[str, float] | None:
    """The cell's headline score: pass@1 of its first task, else validation loss after training."""
    for task, sc in row.get("scores", {}).items():
        if "pass@1" in sc["after"]:
            return f"{task} pass@1", float(sc["after"]["pass@1"])
    if row.get("val_loss_after") is not None:
        return "validation loss", float(row["val_loss_after"])
    return None


def render_markdown(rows: list[dict[str, Any]], base: dict[str, dict[str, float]]) -> str:
    lines = ["# tunelab compare", ""]
    if base:
        lines += ["Base model: " + "; ".join(f"{t} " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()) for t, m in base.items()), ""]
    gpu = any(r.get("peak_gpu_mb") for r in rows)
    lines += ["| cell | method | trainable params | % of model | val loss before -> after | score | vs base | train s | peak RSS MB |"
              + (" peak GPU MB |" if gpu else ""), "|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for r in rows:
        method = (r.get("method") or {}).get("name", "?")
        if r["status"] != "done":
            lines.append(f"| {r['label']} | {method} | | | | {r['status']}: {r.get('error', '')} | | | |" + (" |" if gpu else ""))
            continue
        frac = 100 * r["trainable_params"] / r["total_params"] if r.get("total_params") else float("nan")
        val = (f"{r['val_loss_before']:.4f} -> {r['val_loss_after']:.4f}"
               if r.get("val_loss_before") is not None and r.get("val_loss_after") is not None else "")
        sc = _score(r)
        vs = next((s["vs_base"]["verdict"] for s in r["scores"].values() if "vs_base" in s), "")
        lines.append(f"| {r['label']} | {method} | {r['trainable_params']:,} | {frac:.3f} | {val} | "
                     f"{f'{sc[1]:.3f} ({sc[0]})' if sc else ''} | {vs} | {r.get('wall_s') or 0:.1f} | {r.get('peak_rss_mb') or 0:.0f} |"
                     + (f" {r.get('peak_gpu_mb') or 0:.0f} |" if gpu else ""))
    return "\n".join(lines) + "\n"


def _plot(path: Path, rows: list[dict[str, Any]], base: dict[str, dict[str, float]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [(r["label"], r["trainable_params"], s) for r in rows if r["status"] == "done" and (s := _score(r))]
    fig = Figure(figsize=(7.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, n, (_, y) in pts:
        ax.plot([n], [y], "o", color="tab:blue")
        ax.annotate(label, (n, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if pts and pts[0][2][0].endswith(" pass@1"):  # the base model's score, where the cells are scored on a task
        task = pts[0][2][0].rsplit(" ", 1)[0]
        if "pass@1" in base.get(task, {}):
            ax.axhline(base[task]["pass@1"], ls="--", color="tab:gray", lw=1, label="base model")
            ax.legend(loc="best")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(pts[0][2][0] if pts else "score")
    ax.set_title("score vs trainable parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
