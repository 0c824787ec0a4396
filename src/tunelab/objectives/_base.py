"""The objective contract: `loss(model, batch, num_items) -> (loss, metrics)`.

`num_items` is the number of loss items (label tokens for SFT) in the whole optimizer step, summed over
gradient-accumulation micro-batches and processes, so accumulated gradients equal one big batch's.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel

BatchFormat = Literal["sft", "pairwise", "ranked", "unpaired", "prompt_only"]


class Objective:
    Config: ClassVar[type[BaseModel]]
    batch_format: ClassVar[BatchFormat] = "sft"
    needs_reference: ClassVar[bool] = False
    needs_generation: ClassVar[bool] = False

    def __init__(self, cfg: BaseModel) -> None:
        self.cfg = cfg

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss items in this micro-batch, for normalising across accumulation steps."""
        return int((batch["labels"] != -100).sum())

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError
