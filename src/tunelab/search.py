"""`tunelab search SPACE.yaml`: AutoPEFT-style multi-objective search over method configurations.

Zhou, Wan, Vulić, Korhonen, "AutoPEFT: Automatic Configuration Search for Parameter-Efficient Fine-Tuning",
TACL 2024, arXiv 2301.12132: search which method, where (modules, layers) and how large (sizes, ranks), for the
Pareto front of task score vs trainable parameters, each candidate scored by a short training run.

SPACE.yaml:

    out: runs/search/tiny
    trials: 12
    seed: 0
    score: val_loss                # or "<task>:<metric>", e.g. "mbpp:pass@1" (maximised)
    base: {model: ..., data: ..., train: ..., eval: ...}
    space:                         # candidate method templates; the method is the first choice of a trial
      - {name: houlsby, reduction_factor: {int: [2, 64], log: true}}
      - {name: parallel_adapter, reduction_factor: {categorical: [2, 8, 32]}, sublayer: {categorical: [ffn, attn]}}
      - {name: lora, r: {int: [1, 32], log: true}, target_modules: {subset: [q_proj, k_proj, v_proj, o_proj]}}

A field is fixed, or a distribution: {int: [lo, hi], log, step}, {float: [lo, hi], log}, {categorical: [...]},
{subset: [...]} (each item in or out: AutoPEFT's per-layer insertion mask is `layers: {subset: [0, 1, ...]}` on a
method that takes a layer list). Trials train exactly as `tunelab compare` cells (own process, same data, steps and
seed). Resumable: the optuna study lives in OUT/optuna.db; a trial cut off by a crash is retried with the same
configuration. Writes OUT/search.json (every trial), OUT/pareto.json, OUT/search.md and OUT/search.png.

Deviation: AutoPEFT's search is Bayesian optimisation with a SAAS Gaussian process and the qNEHVI acquisition
(BoTorch); tunelab uses optuna's multi-objective TPE sampler (no BoTorch dependency). The search space is
whatever the user lists (AutoPEFT's SAPPA space = serial adapter, parallel adapter and prefix sizes plus a layer
mask, expressible with the methods above), and the cost objective is the real trainable-parameter count.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunelab.compare import Cell, Grid, _run_cell, cell_config, read_model
from tunelab.errors import UserError

_DISTS = ("int", "float", "categorical", "subset")


class Space(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: dict[str, Any] = Field(default_factory=dict)
    space: list[dict[str, Any]]
    trials: int = Field(12, gt=0)
    seed: int = 0
    score: str = Field("val_loss", description="val_loss (minimised) or <task>:<metric> (maximised)")
    out: str | None = None


def load_space(path: Path) -> tuple[Space, Path]:
    space = read_model(path, Space)
    if not space.space:
        raise UserError(f"{path}: space: no method templates to search")
    for i, tpl in enumerate(space.space):
        if "name" not in tpl:
            raise UserError(f"{path}: space[{i}]: a method template needs a name")
        for key, value in tpl.items():
            if isinstance(value, dict) and not (len(value) >= 1 and next(iter(value)) in _DISTS):
                raise UserError(f"{path}: space[{i}].{key}: a distribution is one of {', '.join(_DISTS)} (got {sorted(value)})")
    if space.score != "val_loss" and ":" not in space.score:
        raise UserError(f"{path}: score: use val_loss or <task>:<metric> (e.g. mbpp:pass@1), got '{space.score}'")
    return space, Path(space.out or Path("runs") / "search" / path.stem)


def _labels(space: Space) -> list[str]:
    names = [t["name"] for t in space.space]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def sample(trial: Any, space: Space) -> dict[str, Any]:
    """A method config drawn for `trial` (the method first, then its own fields, named '<label>.<field>')."""
    labels = _labels(space)
    label = trial.suggest_categorical("method", labels)
    tpl = space.space[labels.index(label)]
    method: dict[str, Any] = {}
    for key, value in tpl.items():
        if not isinstance(value, dict):
            method[key] = value
            continue
        kind, arg = next(iter(value.items()))
        pname = f"{label}.{key}"
        if kind == "int":
            method[key] = trial.suggest_int(pname, arg[0], arg[1], log=bool(value.get("log")), step=value.get("step", 1))
        elif kind == "float":
            method[key] = trial.suggest_float(pname, arg[0], arg[1], log=bool(value.get("log")))
        elif kind == "categorical":
            choices = [json.dumps(c) for c in arg]  # optuna stores only scalars: lists (module names) as JSON
            method[key] = json.loads(trial.suggest_categorical(pname, choices))
        else:  # subset: each item in or out, at least one kept
            kept = [item for item in arg if trial.suggest_categorical(f"{pname}[{item}]", [True, False])]
            method[key] = kept or [arg[0]]
    return method


def _score(rec: dict[str, Any], score: str) -> float | None:
    if score == "val_loss":
        return rec.get("val_loss_after")
    task, metric = score.split(":", 1)
    summ = (rec.get("eval") or {}).get(task)
    return None if summ is None else summ.get("metrics", {}).get(metric)


def run_search(path: Path, quiet: bool = False) -> Path:
    import optuna

    space, out = load_space(path)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    maximise = space.score != "val_loss"
    study = optuna.create_study(
        study_name="search", storage=f"sqlite:///{out / 'optuna.db'}", load_if_exists=True,
        directions=["maximize" if maximise else "minimize", "minimize"],
        sampler=optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=min(4, space.trials)),
    )
    running = optuna.trial.TrialState.RUNNING
    for t in study.get_trials(deepcopy=False, states=(running,)):  # cut off by a crash: retry the same config
        study.enqueue_trial(t.params)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    grid = Grid(base=space.base, cells=[Cell(label="probe")])
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    while len(study.get_trials(deepcopy=False, states=finished)) - _retried(study) < space.trials:
        trial = study.ask()
        method = sample(trial, space)
        label = f"trial-{trial.number:03d}"
        cfg = cell_config(grid, Cell(label=label, method=method), out)
        trial.set_user_attr("method", method)
        rec = _run_cell(label, cfg, out, quiet)
        if rec["status"] == "interrupted":
            raise KeyboardInterrupt
        value = _score(rec, space.score) if rec["status"] == "done" else None
        if value is None:
            trial.set_user_attr("error", rec.get("error") or f"no {space.score} in the run")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            trial.set_user_attr("run", rec["run"])
            study.tell(trial, [float(value), float(rec["trainable_params"])])
        _write(out, study, space)
    _write(out, study, space)
    return out


def _retried(study: Any) -> int:
    """Failed trials that were re-enqueued after a crash (they do not count towards the budget)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.name == "FAIL" and "error" not in t.user_attrs)


def _write(out: Path, study: Any, space: Space) -> None:
    trials = []
    pareto = {t.number for t in study.best_trials} if any(t.state.name == "COMPLETE" for t in study.trials) else set()
    for t in study.trials:
        if t.state.name == "RUNNING":
            continue
        trials.append({
            "number": t.number, "state": t.state.name, "method": t.user_attrs.get("method"),
            "score": t.values[0] if t.values else None, "trainable_params": int(t.values[1]) if t.values else None,
            "pareto": t.number in pareto, "run": t.user_attrs.get("run"), "error": t.user_attrs.get("error"),
        })
    (out / "search.json").write_text(json.dumps({"score": space.score, "trials": trials}, indent=2))
    front = sorted((t for t in trials if t["pareto"]), key=lambda t: t["trainable_params"])
    (out / "pareto.json").write_text(json.dumps(front, indent=2))
    lines = [f"# tunelab search ({space.score}; {len(trials)} trials)", "",
             "| trial | method | trainable params | score | Pareto |", "|---|---|---|---|---|"]
    for t in trials:
        m = copy.deepcopy(t["method"] or {})
        desc = f"{m.pop('name', '?')} " + ", ".join(f"{k}={v}" for k, v in m.items())
        score = f"{t['score']:.4f}" if t["score"] is not None else f"failed: {t['error']}"
        params = f"{t['trainable_params']:,}" if t["trainable_params"] is not None else ""
        lines.append(f"| {t['number']} | {desc} | {params} | {score} | {'yes' if t['pareto'] else ''} |")
    (out / "search.md").write_text("\n".join(lines) + "\n")
    _plot(out / "search.png", trials, space.score)


def _plot(path: Path, trials: list[dict[str, Any]], score: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = [t for t in trials if t["score"] is not None]
    ax.plot([t["trainable_params"] for t in done], [t["score"] for t in done], "o", color="tab:gray", label="trial")
    front = sorted((t for t in done if t["pareto"]), key=lambda t: t["trainable_params"])
    ax.plot([t["trainable_params"] for t in front], [t["score"] for t in front], "-o", color="tab:red", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(score)
    ax.set_title("search: score vs trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
