"""Any peft method by its type name: `{name: peft, type: ia3, target_modules: [...], ...}`.

The remaining keys are the fields of peft's config class for that type (IA3Config, PromptTuningConfig,
PrefixTuningConfig, VeraConfig, OFTConfig, LoHaConfig, LoKrConfig, ...), validated against it so a typo is
an error, not a silently ignored setting. Methods and their papers are peft's; tunelab only passes them on.
"""

from __future__ import annotations

import dataclasses
import difflib
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._peft_common import PeftMethod

# peft types whose result folds into the base weights (merge_and_unload works)
MERGEABLE = {"lora", "ia3", "vera", "oft", "boft", "loha", "lokr", "adalora", "hra", "fourierft", "randlora", "delora"}
_RESERVED = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}


@cache
def peft_types() -> dict[str, Any]:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(k.value if hasattr(k, "value") else k).lower(): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def peft_fields(ptype: str) -> list[str]:
    return [f.name for f in dataclasses.fields(peft_types()[ptype]) if f.name not in _RESERVED]


class PeftPassConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Literal["peft"] = "peft"
    type: str = Field(..., description="peft method type, e.g. ia3, prompt_tuning, prefix_tuning, vera, oft, loha, lokr")

    @model_validator(mode="after")
    def _check_fields(self) -> PeftPassConfig:
        types = peft_types()
        if self.type.lower() not in types:
            close = difflib.get_close_matches(self.type.lower(), list(types), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"method.type: unknown peft type '{self.type}'{hint} (known: {', '.join(sorted(types))})")
        valid = peft_fields(self.type.lower())
        for key in self.model_extra or {}:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"; did you mean 'method.{close[0]}'?" if close else ""
                raise UserError(f"unknown config key 'method.{key}' for peft type '{self.type}'{hint}")
        return self


@METHODS.register("peft")
class PeftPassThrough(PeftMethod):
    """Any peft method by type name, with that method's own config fields."""

    Config = PeftPassConfig
    identity_at_init = False  # depends on the type (prompt tuning changes outputs at init)

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return self.cfg.type.lower() in MERGEABLE  # type: ignore[attr-defined]

    @property
    def supports_packing(self) -> bool:
        # prompt-learning types prepend virtual tokens and drop (or offset) position_ids, so samples packed
        # into one row would silently attend to each other
        from peft.config import PromptLearningConfig

        return not issubclass(peft_types()[self.cfg.type.lower()], PromptLearningConfig)  # type: ignore[attr-defined]

    def peft_config(self) -> Any:
        cls = peft_types()[self.cfg.type.lower()]  # type: ignore[attr-defined]
        try:
            return cls(task_type="CAUSAL_LM", **(self.cfg.model_extra or {}))
        except (TypeError, ValueError) as e:
            raise UserError(f"method: invalid settings for peft type '{self.cfg.type}': {e}") from None  # type: ignore[attr-defined]
