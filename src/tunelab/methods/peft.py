"""Any peft method by its type name: `{name: peft, type: ia3, target_modules: [...], ...}`.

The remaining keys are the fields of peft's config class for that type (IA3Config, PromptTuningConfig,
PrefixTuningConfig, VeraConfig, OFTConfig, LoHaConfig, LoKrConfig, ...), validated against it so a typo is
an error, not a silently ignored setting. Methods and their papers are peft's; tunelab passes them on and
fills in what it knows that peft leaves unset:

- prompt-learning types get 20 virtual tokens when `num_virtual_tokens` is unset (peft's documentation
  examples use 20); adaption_prompt gets `adapter_len` 10 and adapters in every layer (its paper's setting
  is the top 30 layers of LLaMA-7B; for smaller models all layers);
- adalora's `total_step` is the run's number of optimizer steps, and its rank allocation
  (`update_and_allocate`) runs after every optimizer step with its importance scores saved in checkpoints.
  Deviation: AdaLoRA's orthogonality regulariser is added by peft only to a loss the model computes itself;
  tunelab's objectives compute the loss from logits, so the regulariser is not applied;
- xlora runs with `use_cache` off (peft requires it) and the model's hidden size.

Types that cannot work in a single-task causal-LM run are listed with the reason and refused by name
(`UNAVAILABLE`); types whose defaults do not fit a model's sizes stop with one line naming the field to set.
"""

from __future__ import annotations

import dataclasses
import difflib
from functools import cache
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._peft_common import PeftMethod

# peft types whose result folds into the base weights (merge_and_unload works)
MERGEABLE = {"lora", "ia3", "vera", "oft", "boft", "loha", "lokr", "adalora", "hra", "fourierft", "randlora", "delora"}
_RESERVED = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}
# types that cannot train in a single-task causal-LM run, and why
UNAVAILABLE = {
    "poly": "routes each example through a task-specific mix of adapters and needs a task id per example; tunelab runs are single-task",
    "multitask_prompt_tuning": "needs a task id per example (multi-task prompt); tunelab runs are single-task",
}
# fields tunelab fills when the user leaves them unset (peft's None would crash)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "prompt_tuning": {"num_virtual_tokens": 20},
    "prefix_tuning": {"num_virtual_tokens": 20},
    "p_tuning": {"num_virtual_tokens": 20},
    "cartridge": {"num_virtual_tokens": 20},
    "cpt": {},
    "adaption_prompt": {"adapter_len": 10},
}
# fields a user must set, with what they mean
_REQUIRED = {
    "trainable_tokens": ("token_indices", "the ids of the tokens whose embeddings train, e.g. [49152, 49153]"),
    "xlora": ("adapters", "X-LoRA mixes LoRA adapters you already trained: {name: adapter dir}"),
}
# the field to change when peft refuses a type's defaults for this model's sizes
_SIZE_FIELD = {"c3a": "block_size", "road": "group_size", "shira": "r", "vblora": "vector_length", "waveft": "n_frequency"}
# types whose tuned model equals the base right after wrapping, on peft's defaults (each checked by
# tests/unit/test_peft_types.py both ways: these equal the base at init, every other offered type does not)
IDENTITY_AT_INIT = {
    "adalora", "adaption_prompt", "beft", "boft", "deft", "delora", "frod", "glora", "gralora", "hira", "hra", "ia3",
    "lily", "ln_tuning", "loha", "lokr", "lora", "miss", "oft", "osf", "peanut", "psoft", "pvera", "randlora",
    "shadow", "supertuning", "tinylora", "vera",
}
# types that act outside the decoder's modules (a side network riding the decoder loop)
_OWN_FORWARD = {"shadow", "xlora"}
# python packages some types import
_NEEDS_PACKAGE = {"adamss": "scikit-learn"}


@cache
def peft_types() -> dict[str, Any]:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(k.value if hasattr(k, "value") else k).lower(): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def usable_types() -> list[str]:
    return sorted(t for t in peft_types() if t not in UNAVAILABLE)


def peft_fields(ptype: str) -> list[str]:
    return [f.name for f in dataclasses.fields(peft_types()[ptype]) if f.name not in _RESERVED]


class PeftPassConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Literal["peft"] = "peft"
    type: str = Field(..., description="peft method type, e.g. ia3, prompt_tuning, prefix_tuning, vera, oft, loha, lokr")

    @model_validator(mode="after")
    def _check_fields(self) -> PeftPassConfig:
        types = peft_types()
        ptype = self.type.lower()
        if ptype not in types:
            close = difflib.get_close_matches(ptype, list(types), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"method.type: unknown peft type '{self.type}'{hint} (known: {', '.join(usable_types())})")
        if ptype in UNAVAILABLE:
            raise UserError(f"method.type: peft type '{ptype}' {UNAVAILABLE[ptype]}")
        valid = peft_fields(ptype)
        for key in self.model_extra or {}:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"; did you mean 'method.{close[0]}'?" if close else ""
                raise UserError(f"unknown config key 'method.{key}' for peft type '{self.type}'{hint}")
        if ptype in _REQUIRED and not (self.model_extra or {}).get(_REQUIRED[ptype][0]):
            field, what = _REQUIRED[ptype]
            raise UserError(f"method.{field}: peft type '{ptype}' needs it set: {what}")
        return self


@METHODS.register("peft")
class PeftPassThrough(PeftMethod):
    """Any peft method by type name, with that method's own config fields."""

    Config = PeftPassConfig

    @property
    def ptype(self) -> str:
        return self.cfg.type.lower()  # type: ignore[attr-defined]

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return self.ptype in MERGEABLE

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return self.ptype in IDENTITY_AT_INIT

    @property
    def supports_packing(self) -> bool:  # type: ignore[override]
        # prompt-learning types prepend virtual tokens and drop (or offset) position_ids, so samples packed
        # into one row would silently attend to each other
        return not self.prompt_learning and self.ptype != "adaption_prompt"

    @property
    def prompt_learning(self) -> bool:
        from peft.config import PromptLearningConfig

        return issubclass(peft_types()[self.ptype], PromptLearningConfig)

    @property
    def virtual_tokens(self) -> int:  # type: ignore[override]
        if not self.prompt_learning:
            return 0
        return int(getattr(self.peft_config(), "num_virtual_tokens", None) or 0)

    @property
    def needs_model_forward(self) -> bool:  # type: ignore[override]
        return self.prompt_learning or self.ptype in _OWN_FORWARD or self.ptype == "adaption_prompt"

    @classmethod
    def listing_notes(cls) -> list[str]:
        notes = ["peft types: " + ", ".join(usable_types())]
        notes += [f"not offered: {t} ({why})" for t, why in sorted(UNAVAILABLE.items())]
        return notes

    def settings(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """The user's fields plus what tunelab fills in (from the run's plan and the model's sizes)."""
        kw = dict(self.cfg.model_extra or {})
        for key, value in _DEFAULTS.get(self.ptype, {}).items():
            kw.setdefault(key, value)
        if self.ptype == "adalora" and kw.get("total_step") is None:
            if self.total_steps is None:
                raise UserError("method.total_step: adalora needs the run's number of steps; set it, or train through tunelab")
            kw["total_step"] = self.total_steps
            # peft's default tinit/tfinal (0) and deltaT suit long runs; keep them inside short ones
            kw.setdefault("tfinal", max(0, self.total_steps // 5))
        if model is not None:
            n_layers = getattr(model.config, "num_hidden_layers", None)
            if self.ptype == "adaption_prompt" and kw.get("adapter_layers") is None and n_layers:
                kw["adapter_layers"] = n_layers
            if self.ptype == "xlora" and kw.get("hidden_size") is None:
                kw["hidden_size"] = model.config.hidden_size
        return kw

    def peft_config(self, model: torch.nn.Module | None = None) -> Any:
        cls = peft_types()[self.ptype]
        try:
            return cls(task_type="CAUSAL_LM", **self.settings(model))
        except (TypeError, ValueError) as e:
            raise UserError(f"method: invalid settings for peft type '{self.ptype}': {str(e).splitlines()[0]}") from None

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        import importlib.util

        if self.ptype in _NEEDS_PACKAGE and importlib.util.find_spec(_NEEDS_PACKAGE[self.ptype].replace("scikit-learn", "sklearn")) is None:
            raise UserError(f"method.type: peft type '{self.ptype}' needs the python package {_NEEDS_PACKAGE[self.ptype]}; "
                            f"pip install {_NEEDS_PACKAGE[self.ptype]}")
        if self.ptype == "xlora":
            model.config.use_cache = False  # peft refuses X-LoRA on a model that caches
        try:
            return self._wrap(model, self.peft_config(model))
        except UserError as e:
            field = _SIZE_FIELD.get(self.ptype)
            raise UserError(f"{e} (set method.{field} to fit this model)" if field else str(e)) from None

    def after_step(self, step: int, model: torch.nn.Module) -> None:
        if self.ptype == "adalora":
            model.base_model.update_and_allocate(step)  # type: ignore[union-attr, operator]

    def extra_state(self, model: torch.nn.Module) -> dict[str, Any]:
        if self.ptype != "adalora":
            return {}
        alloc = model.base_model.rankallocator  # type: ignore[union-attr]
        cfg = model.peft_config["default"]  # type: ignore[index]
        return {"ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc, "rank_pattern": cfg.rank_pattern}

    def load_extra_state(self, model: torch.nn.Module, state: dict[str, Any]) -> None:
        if self.ptype == "adalora" and state:
            alloc = model.base_model.rankallocator  # type: ignore[union-attr]
            alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]
            model.peft_config["default"].rank_pattern = state["rank_pattern"]  # type: ignore[index]
