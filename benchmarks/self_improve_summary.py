"""Summarise a self-improvement experiment (benchmarks/self_improve.sh or its steps run by hand) into JSON + Markdown.

Reads the base model's per-problem MBPP results (an eval summary.json, or the recorded CPU baseline in
benchmarks/results/eval_baselines.json), each tuned run's eval summary and training summary, and the pairs' build
statistics; restricts every comparison to the problems all of them were evaluated on; reports pass@1, fixed and
broken problems and an exact two-sided McNemar test (binomial on the discordant problems).

    python benchmarks/self_improve_summary.py --base-baseline mbpp_test_chat --pairs-stats STATS.json \
        --run dpo=/tmp/si_cpu/dpo --run orpo=/tmp/si_cpu/orpo --tag self_improve
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def mcnemar_exact(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value: P(|X - n/2| >= |fixed - n/2|) for X ~ Binomial(n = fixed + broken, 1/2)."""
    n = fixed + broken
    if n == 0:
        return 1.0
    k = min(fixed, broken)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def per_problem(summary: dict[str, Any]) -> dict[str, bool]:
    return {pid: r["passed"] > 0 for pid, r in summary["per_problem"].items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-summary", type=Path, help="eval summary.json of the base model")
    ap.add_argument("--base-baseline", help="key in results/eval_baselines.json (e.g. mbpp_test_chat) instead")
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR (eval in RUN_DIR/eval/mbpp/eval)")
    ap.add_argument("--pairs-stats", type=Path)
    ap.add_argument("--note", default="")
    ap.add_argument("--tag", default="self_improve")
    a = ap.parse_args()
    runs = {n: Path(d) for n, d in (r.split("=", 1) for r in a.run)}
    tuned = {n: json.loads((d / "eval" / "mbpp" / "eval" / "summary.json").read_text()) for n, d in runs.items()}
    ids = set.intersection(*(set(s["per_problem"]) for s in tuned.values()))
    if a.base_summary:
        base = per_problem(json.loads(a.base_summary.read_text()))
    else:
        rec = json.loads((RESULTS / "eval_baselines.json").read_text())["results"][a.base_baseline]
        solved = set(rec["solved"])
        base = {pid: pid in solved for pid in ids}
    ids &= set(base)
    out: dict[str, Any] = {
        "problems": len(ids), "task_ids": f"{min(map(int, ids))}-{max(map(int, ids))}",
        "base_pass@1": sum(base[i] for i in ids) / len(ids), "note": a.note,
        "pairs": json.loads(a.pairs_stats.read_text()) if a.pairs_stats else None, "runs": {},
    }
    for name, s in tuned.items():
        got = per_problem(s)
        fixed = sorted((i for i in ids if got[i] and not base[i]), key=int)
        broken = sorted((i for i in ids if base[i] and not got[i]), key=int)
        train = json.loads((runs[name] / "summary.json").read_text())
        cfg = (runs[name] / "config.yaml").read_text()
        out["runs"][name] = {
            "pass@1": sum(got[i] for i in ids) / len(ids), "fixed": fixed, "broken": broken,
            "mcnemar_p": mcnemar_exact(len(fixed), len(broken)), "steps": train["steps"],
            "val_loss_before": train["val_loss_before"], "val_loss_after": train["val_loss_after"],
            "train_wall_s": train["wall_s"], "config": cfg,
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.tag}.json").write_text(json.dumps(out, indent=2))
    lines = [f"# Self-improvement on MBPP ({out['problems']} test problems, task_ids {out['task_ids']})", "", a.note, "",
             "| model | pass@1 | fixed | broken | McNemar p | val loss before -> after |", "|---|---|---|---|---|---|",
             f"| base | {out['base_pass@1']:.3f} | | | | |"]
    for name, r in out["runs"].items():
        lines.append(f"| {name} | {r['pass@1']:.3f} | {len(r['fixed'])} | {len(r['broken'])} | {r['mcnemar_p']:.3f} | "
                     f"{r['val_loss_before']:.4f} -> {r['val_loss_after']:.4f} |")
    (RESULTS / f"{a.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
