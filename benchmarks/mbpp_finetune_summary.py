"""Summary of benchmarks/mbpp_finetune.sh's work directory.

Per cell: pass@1 on MBPP test before (the base model, same prompt) and after, fixed/broken problems, the exact
McNemar p-value and the paired bootstrap CI (`tunelab.evaluate.stats`, the functions the run report uses), and
validation loss before/after with its verdict. Writes WORK_DIR/mbpp_finetune.json and prints one line per cell.

Usage: python3 benchmarks/mbpp_finetune_summary.py WORK_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tunelab.evaluate.stats import compare_pass, passed_per_problem


def _eval(run: Path) -> dict[str, Any] | None:
    f = run / "eval" / "mbpp" / "eval" / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def summarise(w: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"base": {}, "cells": {}}
    for mode in ("chat", "fewshot"):
        s = _eval(w / f"base_{mode}")
        out["base"][mode] = s and {"pass@1": s["metrics"]["pass@1"], "problems": s["n_problems"], "status": s["status_counts"],
                                   "eval_s": s["wall_s"], "isolation": s["isolation"], "settings": s["settings"]}
    for line in (w / "cells.txt").read_text().splitlines():
        name, spec = line.split("|")
        mode, *overrides = spec.split()
        base, after = _eval(w / f"base_{mode}"), _eval(w / name)
        cell: dict[str, Any] = {"prompt": mode, "overrides": overrides}
        if (w / name / "summary.json").is_file():
            r = json.loads((w / name / "summary.json").read_text())
            cell |= {k: r.get(k) for k in ("steps", "train_tokens", "tokens_per_s", "val_loss_before", "val_loss_after", "peak_gpu_mb")}
            cell["train_s"] = r.get("wall_s")
            cell["loss_verdict"] = next(iter(r.get("verdicts") or []), None)  # eval.tasks was empty: only the loss one
        if base and after:
            cell |= {"pass@1": after["metrics"]["pass@1"], "status": after["status_counts"], "eval_s": after["wall_s"],
                     "vs_base": compare_pass(passed_per_problem(base), passed_per_problem(after)).as_dict()}
        out["cells"][name] = cell
    return out


def main() -> None:
    w = Path(sys.argv[1])
    out = summarise(w)
    (w / "mbpp_finetune.json").write_text(json.dumps(out, indent=2))
    for mode, b in out["base"].items():
        print(f"base {mode}: pass@1 {b['pass@1']:.3f}" if b else f"base {mode}: missing")
    for name, c in out["cells"].items():
        v = c.get("vs_base")
        print(f"{name}: val loss {c.get('val_loss_before')} -> {c.get('val_loss_after')}; "
              + (f"pass@1 {c['pass@1']:.3f}; {v['verdict']}" if v else "no evaluation"))


if __name__ == "__main__":
    main()
