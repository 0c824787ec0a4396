"""The method contract shared by every tuning method.

A method turns a loaded model into a trainable one (`apply`), saves what it trained (`save_final`) in a
format other tools load, and rebuilds the tuned model from that (`load_final`). Capability flags replace
`if name == ...` checks elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel


class Method:
    Config: ClassVar[type[BaseModel]]
    #: the saved result is a PEFT adapter (PeftModel.from_pretrained loads it)
    is_peft: ClassVar[bool] = False
    #: the trained part folds into the base weights (export --merge)
    mergeable: ClassVar[bool] = False
    #: right after `apply`, outputs equal the base model's
    identity_at_init: ClassVar[bool] = True
    #: works on a 4/8-bit quantized base
    supports_quantized_base: ClassVar[bool] = False
    #: trains correctly on packed rows (prompt-learning methods prepend tokens and cannot)
    supports_packing: ClassVar[bool] = True
    #: `disabled()` can switch the trained part off, giving the base model's outputs without a second copy
    can_disable: ClassVar[bool] = False

    def __init__(self, cfg: BaseModel) -> None:
        self.cfg = cfg

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def param_groups(self, model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; a method with its own learning rates overrides this."""
        from tunelab.train.optim import param_groups

        return param_groups(model, lr, weight_decay)

    @contextmanager
    def disabled(self, model: torch.nn.Module) -> Iterator[None]:
        """Within the context the model computes the base model's outputs (reference log-probs)."""
        raise NotImplementedError(
            f"method '{self.cfg.name}' trains the base weights in place, so it cannot switch itself off; "  # type: ignore[attr-defined]
            "its reference log-probs are precomputed instead"
        )
        yield  # pragma: no cover

    def save_final(self, model: torch.nn.Module, path: Path) -> None:
        """Default: the full weights in transformers format."""
        model.save_pretrained(path, safe_serialization=True)

    def load_final(self, base: torch.nn.Module, path: Path) -> torch.nn.Module:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            state.update(load_file(f))
        missing, unexpected = base.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"{path}: weights do not fit the base model: {unexpected[:3]}")
        return base

    def merged(self, model: torch.nn.Module) -> torch.nn.Module:
        """The tuned model as a plain transformers model (identity for methods that train weights in place)."""
        return model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
