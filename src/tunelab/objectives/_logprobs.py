"""Shared log-prob utilities for objectives.

`label_logits` computes logits only at positions that carry a label. For completion-only SFT most prompt
positions carry none, and the LM head (vocab x hidden) is a large share of a small model's compute, so this
skips that work. It calls the decoder and the head separately; for models whose head does more than a
linear map (logit soft-capping, logit scaling) and for prompt-learning PEFT types it falls back to the
model's own forward.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def _plain_lm(model: Any) -> Any | None:
    """The transformers model under any PEFT wrapper, if the fast path is valid for it."""
    peft_cfg = getattr(model, "active_peft_config", None)
    if peft_cfg is not None and getattr(peft_cfg, "is_prompt_learning", False):
        return None
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if any(getattr(lm.config, k, None) for k in _HEAD_EXTRAS):
        return None
    if not hasattr(lm, "get_decoder") or lm.get_output_embeddings() is None:
        return None
    return lm


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}


def label_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits[N, V] at labelled positions, labels[N]); labels in `batch` are already shifted."""
    labels = batch["labels"]
    sel = labels != IGNORE
    lm = _plain_lm(model)
    if lm is None:
        logits = model(**model_inputs(batch), use_cache=False).logits
        logits = logits[:, -labels.shape[1] :]  # prompt tuning prepends virtual positions
        return logits[sel], labels[sel]
    hidden = lm.get_decoder()(**model_inputs(batch), use_cache=False).last_hidden_state
    return lm.get_output_embeddings()(hidden[sel]), labels[sel]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position, computed in fp32 for stability."""
    return -torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
