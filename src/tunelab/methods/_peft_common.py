"""Shared by the peft-backed methods: wrap, save, load and merge through peft itself.

peft 0.21's prompt-learning `generate` (prefix tuning, cartridge, ...) looks for the cache under the name
`past_key_values`, which transformers 5 renamed to `cache`; unpatched it silently decodes the base model.
`name_cache_for_peft` renames it for peft and back for the model, on every prompt-learning peft model tunelab
builds or loads (tested against a plain greedy loop in tests/unit/test_method_mam.py and test_peft_types.py).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
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
            tuned = get_peft_model(model, config)
            if getattr(config, "is_prompt_learning", False):
                name_cache_for_peft(tuned)
            return tuned
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

        tuned = PeftModel.from_pretrained(base, str(path))
        if tuned.active_peft_config.is_prompt_learning:
            name_cache_for_peft(tuned)
        return tuned

    @cached_property
    def virtual_tokens(self) -> int:  # type: ignore[override]
        cfg = self.peft_config()
        return int(getattr(cfg, "num_virtual_tokens", None) or 0) if getattr(cfg, "is_prompt_learning", False) else 0

    def merged(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.mergeable:
            raise NotImplementedError(f"peft method '{self.cfg.name}' cannot be folded into the base weights")
        return model.merge_and_unload()


def name_cache_for_peft(tuned: Any) -> None:
    """Make peft's prefix injection work in `generate` on transformers versions whose models call the cache `cache`.

    peft's `prepare_inputs_for_generation` calls the base model's version (`base_model_prepare_inputs_for_generation`),
    then looks for an empty cache under `past_key_values` to put the prefix in. Renaming the key for peft, and back
    for the model's forward, keeps both sides on their own names."""
    model_forward = inspect.signature(tuned.get_base_model().forward).parameters
    if "cache" not in model_forward:
        return  # the model still takes `past_key_values`: peft's own code is right
    base_prepare: Callable[..., dict[str, Any]] = tuned.base_model_prepare_inputs_for_generation
    peft_prepare: Callable[..., dict[str, Any]] = tuned.prepare_inputs_for_generation

    @functools.wraps(base_prepare)
    def base_named_for_peft(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out = base_prepare(*args, **kwargs)
        if "cache" in out:
            out["past_key_values"] = out.pop("cache")
        return out

    @functools.wraps(peft_prepare)
    def peft_named_for_model(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out = peft_prepare(*args, **kwargs)
        if "past_key_values" in out:
            out["cache"] = out.pop("past_key_values")
        return out

    tuned.base_model_prepare_inputs_for_generation = base_named_for_peft
    tuned.prepare_inputs_for_generation = peft_named_for_model
