"""Shared log-prob utilities for objectives.

`label_logits` computes logits only at positions that carry a label. For completion-only SFT most prompt
positions carry none, and the LM head (vocab x hidden) is a large share of a small model's compute, so this
skips that work. It calls the decoder and the head separately; for models whose head does more than a
linear map (logit soft-capping, logit scaling) and for methods that add virtual tokens it falls back to the
model's own forward.

Under data parallelism (DDP, FSDP) the model an objective receives is the wrapper. The fast path must still
run *inside* the wrapper's forward: DDP arms its gradient all-reduce there and FSDP gathers the shards there
(FSDP2 has no wrapper object: the sharded root's own call does it). `through_wrapper` does that by handing the
wrapper (or the sharded root) a forward to call for this one pass.

`label_token_logprobs` goes one step further for objectives that only need log p(label): the LM head and the
log-softmax run over chunks of labelled positions, each under activation checkpointing, so a long row's
[N, vocab] logits never exist at once (at most LOGITS_CHUNK_BYTES of fp32 logits live, in forward and in
backward, at the price of recomputing one chunk's head matmul in backward). Up to one chunk of labels (1,365
positions for a 49k vocabulary) it is a single plain pass: short rows pay nothing.

`sequence_logps` sums token log-probs per sequence (chosen, rejected, each ranked response...) in one
forward pass over the whole batch, whatever its layout (padded rows or packed segments): a batch's
`seq_index` names the sequence of every labelled position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.methods._base import needs_model_forward

IGNORE = -100
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def unwrap(model: Any) -> Any:
    """The tuned model under a DDP/FSDP/DeepSpeed wrapper (itself when there is none)."""
    from accelerate.utils import extract_model_from_parallel

    # keep_fp32_wrapper: accelerate's mixed-precision forward stays installed (False would remove it for good)
    return extract_model_from_parallel(model, keep_fp32_wrapper=True)


def _sharded(model: Any) -> bool:
    """FSDP2 shards a module in place (no wrapper object): its forward hook gathers the root's parameters."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def through_wrapper(model: Any, fn: Callable[..., Any], **inputs: Any) -> Any:
    """`fn(**inputs)` run as the forward of the tuned model inside `model`'s parallel wrapper, if any."""
    inner = unwrap(model)
    if inner is model and not _sharded(model):
        return fn(**inputs)
    saved = inner.__dict__.get("forward")  # accelerate's autocast wrapper, when mixed precision is on
    inner.forward = fn
    try:
        return model(**inputs)
    finally:
        if saved is None:
            del inner.forward
        else:
            inner.forward = saved


def _plain_lm(model: Any) -> Any | None:
    """The transformers model under any parallel or PEFT wrapper, if the fast path is valid for it."""
    from peft import PeftModel

    model = unwrap(model)
    if needs_model_forward(model):
        return None
    lm = model.get_base_model() if isinstance(model, PeftModel) else model
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

    def head_at_labels(**inputs: torch.Tensor) -> torch.Tensor:
        hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
        return lm.get_output_embeddings()(hidden[sel])

    return through_wrapper(model, head_at_labels, **model_inputs(batch)), labels[sel]


LOGITS_CHUNK_BYTES = 256 * 2**20


def _chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return token_logprobs(head(hidden), labels)


def chunked_head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                          chunk_bytes: int = LOGITS_CHUNK_BYTES) -> torch.Tensor:
    """log p(label) [N] = log_softmax(head(hidden))[label], with at most `chunk_bytes` of fp32 logits alive."""
    from torch.utils.checkpoint import checkpoint

    vocab = head.weight.shape[0]
    chunk = max(1, chunk_bytes // (4 * vocab))
    if hidden.shape[0] <= chunk:
        return _chunk_logprobs(head, hidden, labels)
    return torch.cat([
        checkpoint(_chunk_logprobs, head, hidden[i : i + chunk], labels[i : i + chunk], use_reentrant=False)
        for i in range(0, hidden.shape[0], chunk)
    ])


def label_token_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label)[N] at labelled positions, labels[N]), without materialising all [N, V] logits at once."""
    labels = batch["labels"]
    sel = labels != IGNORE
    lm = _plain_lm(model)
    if lm is None:
        logits, picked = label_logits(model, batch)
        return token_logprobs(logits, picked), picked

    def logprobs_at_labels(**inputs: torch.Tensor) -> torch.Tensor:
        hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
        return chunked_head_logprobs(lm.get_output_embeddings(), hidden[sel], labels[sel])

    return through_wrapper(model, logprobs_at_labels, **model_inputs(batch)), labels[sel]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position, computed in fp32 for stability."""
    return -torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")


@dataclass
class SeqLogps:
    """Per-sequence summed log-probs over completion tokens, with the token counts (both shape [S])."""

    sum: torch.Tensor
    count: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """Length-normalised log-prob (average over the sequence's completion tokens)."""
        return self.sum / self.count.clamp(min=1)

    def detach(self) -> SeqLogps:
        return SeqLogps(self.sum.detach(), self.count)


def reduce_by_sequence(token_lp: torch.Tensor, seq: torch.Tensor, num_seqs: int) -> SeqLogps:
    """Sum token log-probs `token_lp[N]` into sequences by index `seq[N]` (0..num_seqs-1)."""
    sums = torch.zeros(num_seqs, dtype=token_lp.dtype, device=token_lp.device).index_add(0, seq, token_lp)
    counts = torch.zeros(num_seqs, dtype=torch.long, device=seq.device).index_add(0, seq, torch.ones_like(seq))
    return SeqLogps(sums, counts)


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> SeqLogps:
    """Summed completion log-probs of every sequence in the batch, in one forward pass."""
    lp, _ = label_token_logprobs(model, batch)
    sel = batch["labels"] != IGNORE
    return reduce_by_sequence(lp, batch["seq_index"][sel], int(batch["num_seqs"]))
