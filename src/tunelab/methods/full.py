"""Full fine-tuning: every parameter trains. The baseline that PEFT methods are measured against."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from tunelab.methods import METHODS
from tunelab.methods._base import Method


class FullConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["full"] = "full"


@METHODS.register("full")
class Full(Method):
    Config = FullConfig

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def expected_trainable(self, model: torch.nn.Module) -> int:
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
