"""Loading a finished run back (`tunelab.load`) and `tunelab export RUN [--merge]`.

Every run directory loads through one function whatever its method: RUN/final/tunelab.json names the method
and its saved format, and the method's own `load_final` rebuilds the tuned model on the base. Export writes a
standalone transformers checkpoint and proves it loads (same tensor names as the base model) before it is put
in place, so an adapter method can never leave weights behind that no tool can read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from tunelab.config import ModelConfig
from tunelab.errors import UserError


def run_info(run: Path) -> dict[str, Any]:
    """RUN/final/tunelab.json: method name, model config and saved format of a finished run."""
    meta = run / "final" / "tunelab.json"
    if not meta.is_file():
        raise UserError(f"{run}: no finished run here ({meta} missing); train it first or pass a run directory")
    info = json.loads(meta.read_text())
    info.setdefault("saved_format", "peft" if (run / "final" / "adapter_config.json").is_file() else "full")
    return info


def load_tuned(run: Path, device: str = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """(tuned model, tokenizer, method) rebuilt from RUN/final on top of the base model."""
    from tunelab.config import read_yaml, validate
    from tunelab.methods import METHODS
    from tunelab.models import load_model

    run = Path(run)
    info = run_info(run)
    cfg = validate(read_yaml(run / "config.yaml"), str(run / "config.yaml"))
    base, tok = load_model(ModelConfig(**info["model"]), device)
    method = METHODS.get(info["method"])(cfg.method)
    try:
        model = method.restore(base, run / "final")
    except ValueError as e:
        raise UserError(f"{run / 'final'}: cannot load the tuned model: {e}") from None
    model.eval()
    return model, tok, method


def load(run_dir: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """The tuned model and its tokenizer from a finished run directory, whatever method trained it.

    >>> model, tok = tunelab.load("runs/quickstart")
    """
    model, tok, _ = load_tuned(Path(run_dir), device)
    return model, tok


def export_run(run: Path, merge: bool, out: Path | None = None) -> Path:
    model, tok, method = load_tuned(run)
    fmt = method.saved_format
    if merge:
        if not method.mergeable:
            raise UserError(f"method '{method.cfg.name}' cannot be folded into the base weights, so there is no standalone "
                            f"checkpoint to export; load the run with tunelab.load('{run}') or `tunelab eval {run}`")
        model = method.merged(model)
    elif fmt == "peft":
        raise UserError("the run holds a PEFT adapter (already in RUN/final, loadable by peft); pass --merge for a standalone model")
    elif fmt == "tunelab":
        hint = "pass --merge for a standalone model" if method.mergeable else f"load it with tunelab.load('{run}')"
        raise UserError(f"RUN/final holds method '{method.cfg.name}' in tunelab's own format; {hint}")
    dest = out or run / ("merged" if merge else "export")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        _check_loads(tmp, model)
    except ValueError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _check_loads(path: Path, model: torch.nn.Module) -> None:
    """The written checkpoint loads as a plain transformers model: no unexpected or missing tensors."""
    from transformers import AutoModelForCausalLM

    loaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    bad = list(info.get("unexpected_keys") or []) + list(info.get("missing_keys") or [])
    if bad:
        raise ValueError(f"internal error: the exported checkpoint does not load cleanly ({bad[:3]}); nothing was written")
    sd = model.state_dict()
    for name, t in loaded.state_dict().items():
        if name in sd and not torch.equal(t.to(sd[name].dtype), sd[name].cpu()):
            raise ValueError(f"internal error: exported tensor {name} differs after loading; nothing was written")
