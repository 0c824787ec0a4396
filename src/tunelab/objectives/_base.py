"""The objective contract: `loss(model, batch, num_items, ref) -> (loss, metrics)`.

An objective declares the shape of data it trains on (`batch_format`); the data stage picks the batcher for
that format (`tunelab.data.batching`), so a pairwise objective can never receive SFT batches. A batch
carries, besides the model inputs, `seq_index` (which sequence each labelled position belongs to),
`num_seqs`, `sample_ids` (dataset index of each unit: a sample, a pair, a ranked group) and the format's
own fields (see the batcher files). Sequence log-probs come from `objectives._logprobs.sequence_logps`.

`num_items` is the number of loss items (label tokens for SFT, units for the other formats) in the whole
optimizer step, summed over gradient-accumulation micro-batches and processes, so accumulated gradients
equal one big batch's. `ref` is the run's reference provider (`train.reference`) when `needs_reference`
is set, else None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel

if TYPE_CHECKING:
    from tunelab.evaluate.tasks._base import Problem, Task
    from tunelab.objectives._online import OnlineConfig
    from tunelab.train.reference import Reference

#: a batcher name (`tunelab.data.batching`: one file per format), so a new data shape is one new batcher file
BatchFormat = str
Batch = dict[str, torch.Tensor]


@dataclass
class PrepareContext:
    """What `Objective.prepare` gets, once per run before training: the data in the objective's shape and the
    means to run a model over it in the training precision."""

    units: list[Any]  # train + validation units (`tunelab.data.batching.Unit`), sample ids unique
    batcher: Any  # the format's batcher: `batcher.collate([[u] for u in chunk], pad_id, packed=False)`
    pad_id: int
    device: Any
    autocast: Any  # a context-manager factory: the training precision
    batch_size: int
    cache_dir: Path  # where precomputed tables live (keyed by the objective itself), beside the tokenisation cache
    quiet: bool = False
    #: the base model, before the method is applied (read-only: e.g. a teacher for self-distillation)
    model: Any = None


class Objective:
    Config: ClassVar[type[BaseModel]]
    #: the data shape this objective trains on; picks the batcher
    batch_format: ClassVar[BatchFormat] = "sft"
    #: the loss needs reference-model log-probs (the loop builds a `Reference` and passes it as `ref`)
    needs_reference: ClassVar[bool] = False
    #: what the loss is averaged over: label tokens (token-level LM losses) or units (pairs, groups, samples)
    loss_items: ClassVar[Literal["tokens", "units"]] = "units"
    #: accumulating micro-batches with the step's `num_items` gives exactly one big batch's loss; False for
    #: losses with a batch-level statistic (KTO's KL estimate), which the contract test then skips, saying why
    accumulation_invariant: ClassVar[bool] = True

    def __init__(self, cfg: BaseModel) -> None:
        self.cfg = cfg
        self.step = 0
        self.total_steps = 1

    def num_items(self, batch: Batch) -> int:
        """Loss items in this micro-batch, as `loss_items` declares: label tokens, or units."""
        if self.loss_items == "tokens":
            return int((batch["labels"] != -100).sum())
        return int(batch["sample_ids"].numel())

    @property
    def prepare_reads_weights(self) -> bool:
        """`prepare` reads the trained model's weights (self-distillation scores with them). A sharded run then
        materialises the base model on every rank instead of only on the main one."""
        return False

    def prepare(self, ctx: PrepareContext) -> None:
        """Once per run, before the first step (and again on resume): precompute what the loss needs from models
        other than the one being trained (e.g. a teacher's distributions). Work must be cached so a resumed run
        does not redo it. Default: nothing."""

    @property
    def online(self) -> OnlineConfig | None:
        """Set when the objective trains on rollouts drawn from the model during training (`objectives/_online.py`):
        the loop then takes its training batches from `train/rollouts.py`, not from `data.train`."""
        return None

    def rollout_rows(self, task: Task, problems: list[Problem], samples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Training rows in this objective's `batch_format` from one round of judged samples (the evaluation
        runner's samples.jsonl rows), and counts of what happened. Needed only when `online` is set."""
        raise NotImplementedError(f"objective '{self.cfg.name}' has no online mode")  # type: ignore[attr-defined]

    def on_step(self, step: int, total_steps: int) -> None:
        """Called by the loop before each optimizer step (0-based) for schedules inside an objective."""
        self.step, self.total_steps = step, total_steps

    def loss(self, model: Any, batch: Batch, num_items: int, ref: Reference | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError
