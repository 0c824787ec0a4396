"""Atomic checkpoints that resume exactly.

A checkpoint is a directory `checkpoints/step-N/` holding the trainable parameters (safetensors), optimizer
and scheduler state, the loop state (step, data position, counters) and one RNG file per process
(`rng-<rank>.pt`: dropout and any sampling differ per rank). It is written to a temporary directory and
renamed into place, so a crash (even kill -9) leaves either the whole checkpoint or none. Only the newest
`keep_last` are kept.

Several processes (data parallel): parameters and optimizer state are the same on every rank, so the main
process writes them; every rank writes its own RNG file into the shared temporary directory, and the main
process renames it into place once all have. The run directory must be on a filesystem every node sees.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunelab.train.dist import SINGLE, Dist


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: epoch ...
    micro: int = 0  # ... and micro-batch index within it
    tokens: int = 0  # real (non-padding) tokens trained on
    wall_s: float = 0.0
    world_size: int = 1  # processes that trained up to here (each has its own RNG file)
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


def _write_synced(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def save_checkpoint(
    ckpt_root: Path, tensors: dict[str, torch.Tensor], optimizer: Any, scheduler: Any, state: LoopState, keep_last: int,
    method_state: dict[str, Any] | None = None, dist: Dist = SINGLE, optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """`tensors`: what the method needs to resume (`Method.checkpoint_state`, by default the trainable parameters);
    `method_state`: the method's non-parameter state (`Method.extra_state`). Every rank calls this.
    `optimizer_state`: written instead of `optimizer.state_dict()` (a sharded run passes the gathered full state)."""
    final = ckpt_root / f"step-{state.step}"
    tmp = ckpt_root / f".tmp-step-{state.step}"
    if dist.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(".tmp-step-*"):  # left by a crash (one writer per run, so none is live)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    _write_synced(tmp / f"rng-{dist.rank}.pt", lambda p: torch.save(_rng_state(), p))
    dist.barrier()
    if dist.is_main:
        state.world_size = dist.world
        _write_synced(tmp / "trainable.safetensors",
                      lambda p: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, p))
        _write_synced(tmp / "state.pt", lambda p: torch.save(
            {"optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
             "scheduler": scheduler.state_dict(), "method": method_state or {}}, p))
        _write_synced(tmp / "loop.json", lambda p: p.write_text(json.dumps(asdict(state))))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # nobody reads or prunes checkpoints until this one is in place
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary dirs from a crash are ignored)."""
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.glob("step-*") if (p / "loop.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, method_state: Callable[[dict[str, Any]], None] | None = None,
    dist: Dist = SINGLE, load_tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
    load_optimizer: Callable[[dict[str, Any]], None] | None = None,
) -> LoopState:
    """`load_tensors` / `load_optimizer`: how full tensors and optimizer state reach the model and optimizer
    (default: copy into the parameters, `optimizer.load_state_dict`; a sharded run scatters them)."""
    tensors = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing:
        raise RuntimeError(f"{path}: checkpoint parameters not in the model: {missing[:3]}")
    if load_tensors is not None:
        load_tensors(tensors)
    else:
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v)
    blob = torch.load(path / "state.pt", weights_only=False)
    (load_optimizer or optimizer.load_state_dict)(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    state = LoopState(**json.loads((path / "loop.json").read_text()))
    rng = path / f"rng-{dist.rank}.pt"
    if state.world_size != dist.world and dist.is_main:
        # parameters, optimizer and data position carry over; random streams (dropout) cannot be matched
        print(f"note: {path} was written by {state.world_size} process(es) and resumes on {dist.world}: the run "
              "continues from the same step and data position, but is not bit-identical to an uninterrupted run",
              file=sys.stderr)
    if rng.is_file() and state.world_size == dist.world:
        _set_rng_state(torch.load(rng, weights_only=False))
    if method_state is not None:
        method_state(blob.get("method") or {})
    return state
