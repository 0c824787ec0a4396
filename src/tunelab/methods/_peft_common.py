"""Shared by the peft-backed methods: wrap, save, load and merge through peft itself."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import UserError
from tunelab.methods._base import Method


class PeftMethod(Method):
    saved_format = "peft"
    mergeable = False
    can_disable = True

    def peft_config(self) -> Any:
        raise NotImplementedError

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        return self._wrap(model, self.peft_config())

    def _wrap(self, model: torch.nn.Module, config: Any) -> torch.nn.Module:
        from peft import get_peft_model

        try:
            return get_peft_model(model, config)
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

    @cached_property
    def virtual_tokens(self) -> int:  # type: ignore[override]
        cfg = self.peft_config()
        return int(getattr(cfg, "num_virtual_tokens", None) or 0) if getattr(cfg, "is_prompt_learning", False) else 0

    def merged(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.mergeable:
            raise NotImplementedError(f"peft method '{self.cfg.name}' cannot be folded into the base weights")
        return model.merge_and_unload()
