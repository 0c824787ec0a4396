"""How the processes of a run hold the model: replicated (one process, or DDP) or sharded (FSDP2).

The loop asks its engine, never the launcher, at the few points where the two differ: before the optimizer
exists (shard), after (wrap for DDP), when checkpointing and resuming (gather / scatter full tensors), when it
needs the model's outputs for validation (main process alone, or every rank in lockstep) and when it needs the
whole model (evaluation, finalize, the final save: the replicated model itself, or a gathered unsharded copy).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from tunelab.train import checkpoint as ckpt
from tunelab.train import sharded
from tunelab.train.dist import Dist

T = TypeVar("T")


class Replicated:
    """Every process holds the whole model (one process, or DDP through accelerate)."""

    sharded = False

    def __init__(self, acc: Any, dist: Dist) -> None:
        self.acc, self.dist = acc, dist

    def before_optimizer(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def prepare(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        return self.acc.prepare(model, optimizer)

    def plain(self, model: Any) -> torch.nn.Module:
        return self.acc.unwrap_model(model)

    def save(self, root: Path, method: Any, model: Any, optimizer: Any, scheduler: Any, state: ckpt.LoopState, keep: int) -> None:
        plain = self.plain(model)
        ckpt.save_checkpoint(root, method.checkpoint_state(plain), optimizer, scheduler, state, keep, method.extra_state(plain), self.dist)

    def load(self, path: Path, method: Any, model: Any, optimizer: Any, scheduler: Any) -> ckpt.LoopState:
        plain = self.plain(model)
        return ckpt.load_checkpoint(path, plain, optimizer, scheduler, lambda st: method.load_extra_state(plain, st), self.dist)

    def grad_norm(self, value: Any) -> float:
        return float(value)

    def on_outputs(self, model: Any, fn: Callable[[torch.nn.Module], T]) -> T:
        """`fn(model)` on the main process, its result handed to every rank (validation)."""
        return self.dist.from_main(lambda: fn(self.plain(model)))

    def on_whole_model(self, model: Any, fn: Callable[[torch.nn.Module], T]) -> T:
        """`fn(whole model)` on the main process, its result handed to every rank (evaluation, final save)."""
        return self.dist.from_main(lambda: fn(self.plain(model)))


class Sharded(Replicated):
    """FSDP2: each rank holds 1/N of the weights, gradients and optimizer state (train/sharded.py)."""

    sharded = True

    def __init__(self, acc: Any, dist: Dist, build_whole: Callable[[], torch.nn.Module], skeletons: bool) -> None:
        super().__init__(acc, dist)
        self.build_whole = build_whole  # the same architecture, unsharded: for the main process's full copy
        self.skeletons = skeletons  # the other ranks built a meta-device skeleton; the main process fills them

    def before_optimizer(self, model: torch.nn.Module) -> torch.nn.Module:
        main_state = model.state_dict() if self.skeletons and self.dist.is_main else {}
        model = sharded.shard(model, self.dist, self.acc.device)
        if self.skeletons:
            sharded.fill_from_main(model, main_state, self.dist, self.acc.device)
        return model

    def prepare(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        return model, optimizer  # accelerate would wrap the sharded model in DDP on top

    def plain(self, model: Any) -> torch.nn.Module:
        return model

    def save(self, root: Path, method: Any, model: Any, optimizer: Any, scheduler: Any, state: ckpt.LoopState, keep: int) -> None:
        keys = set(method.checkpoint_state(model))
        tensors = sharded.full_state(model, keys)  # collectives: every rank takes part, the main one receives
        optim = sharded.full_optimizer_state(model, optimizer)
        ckpt.save_checkpoint(root, tensors, optimizer, scheduler, state, keep, method.extra_state(model), self.dist,
                             optimizer_state=optim)

    def load(self, path: Path, method: Any, model: Any, optimizer: Any, scheduler: Any) -> ckpt.LoopState:
        return ckpt.load_checkpoint(
            path, model, optimizer, scheduler, lambda st: method.load_extra_state(model, st), self.dist,
            load_tensors=lambda t: sharded.load_full_state(model, t),
            load_optimizer=lambda o: sharded.load_full_optimizer_state(model, optimizer, o),
        )

    def grad_norm(self, value: Any) -> float:
        return sharded.scalar(value)

    def on_outputs(self, model: Any, fn: Callable[[torch.nn.Module], T]) -> T:
        return fn(model)  # a sharded forward is a collective: every rank computes the same result

    def on_whole_model(self, model: Any, fn: Callable[[torch.nn.Module], T]) -> T:
        whole = sharded.unsharded_copy(model, self.build_whole)  # collective; None except on the main process
        return self.dist.from_main(lambda: fn(whole))  # type: ignore[arg-type]  # the copy is freed on return


def make_engine(fsdp: bool, acc: Any, dist: Dist, build_whole: Callable[[], torch.nn.Module], skeletons: bool = False) -> Replicated:
    """`skeletons`: with fsdp, every rank but the main one builds the model on the meta device (sharded.skeleton)."""
    return Sharded(acc, dist, build_whole, skeletons) if fsdp and dist.world > 1 else Replicated(acc, dist)
