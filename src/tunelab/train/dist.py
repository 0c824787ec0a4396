"""What the loop needs to know about the other processes: who is main, how to agree, how to share work.

One process or many, the loop reads the same: a `Dist` answers `rank`, `world`, `is_main`, and offers the few
collectives the loop uses (barrier, a sum of a few numbers, "did any rank ask to stop", a broadcast of the
run-dir decision). With one process they are no-ops, so the single-process path costs nothing.

Launch: `torchrun --nproc_per_node N -m tunelab.cli train ...` on CPUs (gloo) or `accelerate launch` with a
config from configs/accelerate/ on GPUs. accelerate only joins a torch.distributed group on CPU when asked
(`cpu=True`), so `accelerator_kwargs` asks when the launcher set WORLD_SIZE > 1 and no GPU is present.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def launched_world_size() -> int:
    """Processes the launcher (torchrun, accelerate launch, mpirun) started; 1 without a launcher."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def launched_rank() -> int:
    """This process's global rank as the launcher set it (0 without a launcher); readable before any setup."""
    for key in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def accelerator_kwargs() -> dict[str, Any]:
    if launched_world_size() > 1 and not torch.cuda.is_available():
        return {"cpu": True}  # join the gloo group torchrun set up instead of running N independent copies
    return {}


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def of(cls, acc: Any) -> Dist:
        return cls(acc.process_index, acc.num_processes)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Elementwise sum over ranks (fp64, so token counts stay exact)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t.tolist()

    def gather(self, obj: T) -> list[T]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the main process only and hand its result (or its exception) to every rank, so a user
        error found by the main process stops all ranks with the same message instead of leaving them waiting."""
        if self.world == 1:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # re-raised below on every rank
                box[0] = ("error", e)
        torch.distributed.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    @contextmanager
    def main_first(self):  # noqa: ANN201
        """The main process runs the block first (it fills caches: tokenised data, converted weights, reference
        log-probs), then the others run it and read what it wrote."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def shard(self, items: list[T]) -> list[T]:
        """This rank's share of a step's micro-batches: every world-th one, starting at its rank."""
        return items[self.rank :: self.world]


SINGLE = Dist()


def orphaned(launcher_pid: int | None) -> bool:
    """The launcher that started this worker is gone (killed): stop with a checkpoint rather than train on alone."""
    return launcher_pid is not None and os.getppid() != launcher_pid
