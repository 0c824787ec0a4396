"""Training-curve plots for the run report, rendered as base64 PNG data URIs.

matplotlib is imported inside `_render` only, so importing `tunelab.report` stays cheap. The figure is
drawn on an explicit Agg canvas (`matplotlib.figure.Figure` + `FigureCanvasAgg`) instead of pyplot: no
global backend switch, no figure registry to leak, safe next to a caller that uses another backend.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

Series = tuple[list[float], list[float]]
# (legend label, data, "line" | "points" | "series")
Layer = tuple[str, Series, str]


def is_number(value: Any) -> bool:
    """A real int/float (bools excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def series(rows: Sequence[dict[str, Any]], key: str) -> Series:
    """(steps, values) of the rows that carry a finite numeric `step` and `key`, sorted by step."""
    points = sorted(
        (float(r["step"]), float(r[key]))
        for r in rows
        if is_number(r.get("step")) and is_number(r.get(key)) and math.isfinite(r[key])
    )
    return [p[0] for p in points], [p[1] for p in points]


def training_plots(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, data URI) for loss (+ val loss points), learning rate and throughput; absent data is skipped."""
    train = [r for r in rows if "loss" in r]
    loss, val = series(train, "loss"), series(rows, "val_loss")
    lr, tps = series(train, "lr"), series(train, "tokens_per_s")
    plots: list[tuple[str, str]] = []
    if loss[0] or val[0]:
        layers = [("train loss", loss, "line"), ("val loss", val, "points")]
        plots.append(("Loss", _render("Loss", "loss", layers)))
    if lr[0]:
        plots.append(("Learning rate", _render("Learning rate", "lr", [("lr", lr, "line")], sci=True)))
    if tps[0]:
        layers = [("tokens/s", tps, "line")]
        plots.append(("Throughput", _render("Throughput (real tokens/s)", "tokens/s", layers)))
    plots += objective_plots(train)
    rollouts = series(rows, "rollout/sample_pass_rate")  # online runs: the policy's own samples, round by round
    if rollouts[0]:
        layers = [("pass rate of the round's samples", rollouts, "points")]
        plots.append(("Rollouts", _render("Online rollouts: samples passing the task's tests", "pass rate", layers)))
    return plots


def objective_plots(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """One plot per metric group an objective logs as `group/name` (rewards/chosen, rewards/rejected, ...)."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        for k in r:
            if "/" in k and is_number(r[k]):
                keys = groups.setdefault(k.split("/", 1)[0], [])
                if k not in keys:
                    keys.append(k)
    plots = []
    for group, keys in groups.items():
        layers: list[Layer] = [(k.split("/", 1)[1], series(rows, k), "series") for k in keys]
        plots.append((group.capitalize(), _render(f"{group} (objective metrics)", group, layers)))
    return plots


def _render(title: str, ylabel: str, layers: list[Layer], sci: bool = False) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for label, (xs, ys), style in layers:
        if not xs:
            continue
        drawn += 1
        if style == "points":
            ax.plot(xs, ys, "o", ms=5, label=label, color="tab:orange", zorder=3)
        elif style == "series":  # several lines in one plot: matplotlib's colour cycle tells them apart
            ax.plot(xs, ys, "-o" if len(xs) < 2 else "-", ms=3, lw=1.3, label=label)
        else:
            ax.plot(xs, ys, "-o" if len(xs) < 2 else "-", ms=3, lw=1.3, label=label, color="tab:blue")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if sci:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    if drawn > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
