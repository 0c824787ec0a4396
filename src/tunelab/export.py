"""`tunelab export RUN [--merge]`: the tuned model as a standalone transformers checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tunelab.config import ModelConfig
from tunelab.errors import UserError


def load_tuned(run: Path, device: str = "cpu") -> tuple[torch.nn.Module, object, object]:
    """(tuned model, tokenizer, method) rebuilt from RUN/final on top of the base model."""
    from tunelab.config import read_yaml, validate
    from tunelab.methods import METHODS
    from tunelab.models import load_model

    final = run / "final"
    meta = final / "tunelab.json"
    if not meta.is_file():
        raise UserError(f"{run}: no finished run here ({meta} missing); train it first or pass a run directory")
    info = json.loads(meta.read_text())
    cfg = validate(read_yaml(run / "config.yaml"), str(run / "config.yaml"))
    base, tok = load_model(ModelConfig(**info["model"]), device)
    method = METHODS.get(info["method"])(cfg.method)
    return method.load_final(base, final), tok, method


def export_run(run: Path, merge: bool, out: Path | None = None) -> Path:
    model, tok, method = load_tuned(run)
    if merge:
        model = method.merged(model)  # type: ignore[attr-defined]
    elif getattr(method, "is_peft", False):
        raise UserError("the run holds a PEFT adapter (already in RUN/final); pass --merge for a standalone model")
    dest = out or run / ("merged" if merge else "export")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)  # type: ignore[attr-defined]
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
