"""Shared by the peft-backed methods: wrap, save, load and merge through peft itself."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import UserError
from tunelab.methods._base import Method


class PeftMethod(Method):
    is_peft = True
    can_disable = True

    def peft_config(self) -> Any:
        raise NotImplementedError

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import get_peft_model

        try:
            return get_peft_model(model, self.peft_config())
        except (ValueError, TypeError, NotImplementedError) as e:
            raise UserError(f"method '{self.cfg.name}' does not apply to this model: {str(e).splitlines()[0]}") from None

    @contextmanager
    def disabled(self, model: torch.nn.Module) -> Iterator[None]:
        with model.disable_adapter():  # type: ignore[operator]
            yield

    def save_final(self, model: torch.nn.Module, path: Path) -> None:
        model.save_pretrained(path, safe_serialization=True)

    def load_final(self, base: torch.nn.Module, path: Path) -> torch.nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(path))

    def merged(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.mergeable:
            raise UserError(f"method '{self.cfg.name}' cannot be merged into the base weights; export without --merge")
        return model.merge_and_unload()
