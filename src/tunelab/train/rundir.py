"""The run directory: refuse to mix runs, save the resolved config, check it on resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import RunConfig
from tunelab.errors import UserError


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flat(old), _flat(new)
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def prepare(cfg: RunConfig, resume: bool, overwrite: bool) -> tuple[Path, bool]:
    """Create or check the run dir. Returns (path, resuming)."""
    run = Path(cfg.out or "runs/run")
    saved = run / "config.yaml"
    new = cfg.dump()
    if saved.is_file():
        if overwrite:
            shutil.rmtree(run)
        elif resume:
            diff = config_diff(yaml.safe_load(saved.read_text()), new)
            if diff:
                raise UserError(
                    f"{saved}: cannot resume with a changed config ({'; '.join(diff[:4])}); "
                    "rerun with the original settings, or use --overwrite / another --out to start a new run"
                )
            return run, True
        else:
            raise UserError(f"{run} already holds a run; pass --resume to continue it or --overwrite to replace it")
    elif resume and not overwrite:
        raise UserError(f"{run}: nothing to resume (no tunelab run there); drop --resume to start a new run")
    elif run.exists() and any(run.iterdir()) and not overwrite:
        raise UserError(f"{run} exists and is not a tunelab run dir; choose another --out or pass --overwrite")
    run.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(new, sort_keys=False))
    return run, False


class MetricsLog:
    """metrics.jsonl writer; on resume drops lines logged after the checkpoint (they will be redone).
    Written by the main process only (`enabled=False` elsewhere): one row per step, with cross-rank totals."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is not None and path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None:
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
