"""Atomic checkpoints that resume exactly.

A checkpoint is a directory `checkpoints/step-N/` holding the trainable parameters (safetensors), optimizer
and scheduler state, every RNG state, and the loop state (step, data position, counters). It is written to a
temporary directory and renamed into place, so a crash (even kill -9) leaves either the whole checkpoint or
none. Only the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: epoch ...
    micro: int = 0  # ... and micro-batch index within it
    tokens: int = 0  # real (non-padding) tokens trained on
    wall_s: float = 0.0
    val_loss_before: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_root: Path, tensors: dict[str, torch.Tensor], optimizer: Any, scheduler: Any, state: LoopState, keep_last: int,
    method_state: dict[str, Any] | None = None,
) -> Path:
    """`tensors`: what the method needs to resume (`Method.checkpoint_state`, by default the trainable parameters);
    `method_state`: the method's non-parameter state (`Method.extra_state`)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{state.step}"
    tmp = ckpt_root / f".tmp-step-{state.step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                "method": method_state or {}}, tmp / "state.pt")
    (tmp / "loop.json").write_text(json.dumps(asdict(state)))
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary dirs from a crash are ignored)."""
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.glob("step-*") if (p / "loop.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, method_state: Callable[[dict[str, Any]], None] | None = None
) -> LoopState:
    tensors = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing:
        raise RuntimeError(f"{path}: checkpoint parameters not in the model: {missing[:3]}")
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
    blob = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])
    if method_state is not None:
        method_state(blob.get("method") or {})
    return LoopState(**json.loads((path / "loop.json").read_text()))
