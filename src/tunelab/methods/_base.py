"""The method contract shared by every tuning method.

A method turns a loaded model into a trainable one (`apply`), saves what it trained (`save_final`) in a
declared format (`saved_format`), and rebuilds the tuned model from that (`load_final`). Callers go through
`tune` and `restore`, which also record which method built a model, so code that only holds the model
(log-prob helpers, generation backends) can ask `virtual_tokens(model)` instead of probing wrapper internals.
Capability flags replace `if name == ...` checks elsewhere; each is read by the code named in its comment.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel

#: what RUN/final holds: full transformers weights, a peft adapter directory, or tunelab's own adapter format
#: (loadable only through `tunelab.load` / `Method.load_final`)
SavedFormat = Literal["full", "peft", "tunelab"]

_TUNED: weakref.WeakKeyDictionary[torch.nn.Module, Method] = weakref.WeakKeyDictionary()


class Method:
    Config: ClassVar[type[BaseModel]]
    #: read by export, `tunelab eval RUN` and the vLLM backend choice
    saved_format: ClassVar[SavedFormat] = "full"
    #: `merged()` gives a plain transformers model with the same outputs (read by export --merge and the
    #: contract tests); methods that train weights in place are trivially merged
    mergeable: ClassVar[bool] = True
    #: right after `apply`, outputs equal the base model's (contract test)
    identity_at_init: ClassVar[bool] = True
    #: works on a 4/8-bit quantized base
    supports_quantized_base: ClassVar[bool] = False
    #: trains correctly on packed rows (read by the loop; prompt-learning methods prepend tokens and cannot)
    supports_packing: ClassVar[bool] = True
    #: `disabled()` can switch the trained part off, giving the base model's outputs without a second copy
    #: (read by the loop's choice of reference model)
    can_disable: ClassVar[bool] = False

    #: how many training micro-batches `prepare` wants to see before `apply` (read by the loop; 0: none)
    calibration_batches: ClassVar[int] = 0

    def __init__(self, cfg: BaseModel) -> None:
        self.cfg = cfg
        #: the run's optimizer steps, set by the loop before `tune` (a schedule-aware method such as AdaLoRA
        #: reads it); None outside a training run
        self.total_steps: int | None = None

    # -- what a method implements ------------------------------------------------------------------

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
        """Called once before `apply` with `calibration_batches` training micro-batches (model inputs on the
        model's device), for a method that measures the base model first (CRaSh's layer similarities). Must be
        deterministic: a resumed run calls it again and must rebuild the same structure."""

    def finalize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Called by the loop once training ends, before the final validation, save and evaluation: the model
        the run delivers. Default: the trained model itself. (CRaSh plugs its trained layers back into the full
        model; grafting rounds its relaxed mask.)"""
        return model

    @property
    def virtual_tokens(self) -> int:
        """Virtual tokens the method adds to every sequence (a soft prompt prepended to the input, or a prefix
        in the attention cache). The model's own forward must run (read by the log-prob helpers: no decoder
        fast path; its logits may carry that many extra leading positions) and the generation backend cannot
        splice caches (read by the hf backend: no continuous batching)."""
        return 0

    @classmethod
    def listing_notes(cls) -> list[str]:
        """Extra lines `tunelab list methods` shows under the method (the peft types it passes on)."""
        return []

    def expected_trainable(self, model: torch.nn.Module) -> int | None:
        """The trainable-parameter count of the tuned `model` by the method's own formula (e.g. LoRA:
        r * (d_in + d_out) per targeted matrix). The loop and the contract tests compare it with the real
        count, so a method that trains more or less than it claims fails loudly. None: no formula (peft
        pass-through types, whose maths is peft's)."""
        return None

    def param_groups(self, model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; a method with its own learning rates overrides this."""
        from tunelab.train.optim import param_groups

        return param_groups(model, lr, weight_decay)

    def on_step(self, step: int, total_steps: int, model: torch.nn.Module, optimizer: Any) -> None:
        """Called by the loop before every optimizer step (0-based `step`), also the first step after a resume.

        A method that changes what trains during the run (HFT's per-stage halves) does it here, as a pure
        function of `step`, so a resumed run makes the same choice.
        """

    def after_step(self, step: int, model: torch.nn.Module) -> None:
        """Called by the loop right after the optimizer step of 0-based `step`, while the gradients still exist
        (AdaLoRA's rank allocation reads them)."""

    def extra_state(self, model: torch.nn.Module) -> dict[str, Any]:
        """Non-parameter state a checkpoint must keep for an exact resume (saved with the optimizer state)."""
        return {}

    def load_extra_state(self, model: torch.nn.Module, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned; called after the checkpoint's tensors are loaded."""

    @property
    def needs_model_forward(self) -> bool:
        """The tuned model must be called through its own forward: the method acts outside the decoder's
        modules (a soft prompt, a prefix cache, a side network). Read by the log-prob helpers (no decoder +
        head fast path) and the hf generation backend (no cache splicing)."""
        return self.virtual_tokens > 0

    def checkpoint_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must hold to resume exactly: by default the trainable parameters. A method
        whose trainable set changes during the run returns every parameter it may have changed."""
        return trainable_state(model)

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
        if not state:
            raise ValueError(f"{path}: no weights (*.safetensors) in the saved run")
        expected = set(base.state_dict())
        unexpected = sorted(set(state) - expected)
        if unexpected:
            raise ValueError(f"{path}: weights do not fit the base model: {unexpected[:3]}")
        missing = _missing_keys(base, state)
        if missing:
            raise ValueError(f"{path}: the saved weights lack {len(missing)} tensors of the model (e.g. {missing[:3]}); the run is incomplete")
        base.load_state_dict(state, strict=False)
        return base

    def merged(self, model: torch.nn.Module) -> torch.nn.Module:
        """The tuned model as a plain transformers model with the same outputs."""
        if not self.mergeable:
            raise NotImplementedError(f"method '{self.cfg.name}' cannot be folded into the base weights")  # type: ignore[attr-defined]
        return model

    # -- what callers use ----------------------------------------------------------------------------

    def tune(self, model: torch.nn.Module) -> torch.nn.Module:
        """`apply`, remembering that this method built the result."""
        out = self.apply(model)
        _TUNED[out] = self
        return out

    def restore(self, base: torch.nn.Module, path: Path) -> torch.nn.Module:
        """`load_final`, remembering that this method built the result."""
        out = self.load_final(base, path)
        _TUNED[out] = self
        return out


def method_of(model: torch.nn.Module) -> Method | None:
    """The method that built `model` through `tune`/`restore` (None for a plain model)."""
    inner = getattr(model, "module", None)  # a DDP/FSDP wrapper holds the tuned model as .module
    return _TUNED.get(model) or (_TUNED.get(inner) if isinstance(inner, torch.nn.Module) else None)


def virtual_tokens(model: torch.nn.Module) -> int:
    method = method_of(model)
    return method.virtual_tokens if method is not None else 0


def needs_model_forward(model: torch.nn.Module) -> bool:
    method = method_of(model)
    if method is not None:
        return method.needs_model_forward
    # a model tunelab did not build (a PeftModel made by the caller): a prompt-learning peft config is the one
    # case where the decoder alone does not compute the model's outputs
    cfg = getattr(model, "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False))


def _missing_keys(base: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Keys of `base` absent from `state`, ignoring tied weights saved once under another name."""
    ptr_names: dict[int, set[str]] = {}
    for name, t in base.state_dict(keep_vars=True).items():
        ptr_names.setdefault(id(t), set()).add(name)
    return sorted(n for names in ptr_names.values() if not names & state.keys() for n in names)


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
