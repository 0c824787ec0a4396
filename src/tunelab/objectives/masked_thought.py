"""Masked Thought (Chen et al., "Masked Thought: Simply Masking Partial Reasoning Steps Can Improve
Mathematical Reasoning Learning of Language Models", arXiv 2403.02178): SFT in which each response token of
the INPUT is corrupted independently with probability p while the labels keep the original tokens, so the
model learns to predict the gold continuation from a noisy reasoning prefix (prompt tokens are never
corrupted). L is the usual token cross-entropy over the step's label tokens. p ramps linearly from 0 to
max_rate over the first warmup_frac of training, then stays constant; a corrupted token becomes a uniformly
random vocabulary id (`replace: random`, the repo's GSM8K Llama-2 script) or a mask id (`replace: pad`: the
`mask_token_id` field, else the model's pad_token_id, the README recipe). Defaults: max_rate 0.2 (the repo's
MATH and Mistral runs; its GSM8K Llama-2 script uses 0.4), warmup_frac 0.66, replace random. Deviations from
the reference code (ChangyuChen347/MaskedThought): the ramp is step / (warmup_frac * total_steps) (theirs adds
1 to the denominator); each sequence's corruption is drawn from its own generator seeded by (seed, step,
its sample id), never the global RNG, so a resumed run corrupts exactly as the original would and a
sample is corrupted the same whichever micro-batch or packed row it lands in (gradient accumulation stays
exact); corruption only applies in training mode, so validation losses are plain SFT.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunelab.objectives import OBJECTIVES
from tunelab.objectives._base import Batch, Objective
from tunelab.objectives._logprobs import IGNORE, label_logits, unwrap
from tunelab.objectives.sft import sft_loss

if TYPE_CHECKING:
    from tunelab.train.reference import Reference


class MaskedThoughtConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["masked_thought"] = "masked_thought"
    max_rate: float = Field(0.2, ge=0, le=1, description="corruption probability after warm-up (GSM8K Llama-2: 0.4)")
    warmup_frac: float = Field(0.66, ge=0, le=1, description="fraction of training over which the rate ramps from 0")
    replace: Literal["random", "pad"] = Field("random", description="random vocabulary token, or a mask/pad id")
    mask_token_id: int | None = Field(None, ge=0, description="id for replace=pad; default: the model's pad_token_id")
    vocab_size: int | None = Field(None, gt=0, description="random ids are drawn below this; default: the model's")
    seed: int = Field(0, description="corruption seed, combined with the step and the batch's sample ids")


def mask_rate(step: int, total_steps: int, max_rate: float, warmup_frac: float) -> float:
    """Linear ramp 0 -> max_rate over the first `warmup_frac` of `total_steps`, then constant."""
    warmup = warmup_frac * total_steps
    if warmup <= 0:
        return max_rate
    return max_rate * min(1.0, step / warmup)


def response_inputs(labels: torch.Tensor) -> torch.Tensor:
    """Input positions [R, T] holding response tokens: t + 1 for every labelled t (labels are shifted)."""
    pos = torch.zeros_like(labels, dtype=torch.bool)
    pos[:, 1:] = labels[:, :-1] != IGNORE
    return pos


def corrupt(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    rate: float,
    generator: torch.Generator,
    vocab_size: int,
    replace_id: int | None = None,
) -> torch.Tensor:
    """Copy of `input_ids` whose response inputs are replaced with probability `rate` each.

    Replacement: `replace_id` if given, else a uniform id in [0, vocab_size). Draws come from `generator`
    (on its own device, over the whole [R, T] grid, so they depend only on the seed and the shape).
    """
    if rate <= 0:
        return input_ids
    dev = generator.device
    hit = torch.rand(input_ids.shape, generator=generator, device=dev) < rate
    if replace_id is None:
        repl = torch.randint(0, vocab_size, input_ids.shape, generator=generator, device=dev)
    else:
        repl = torch.full(input_ids.shape, replace_id, device=dev)
    hit = hit.to(input_ids.device) & response_inputs(labels)
    return torch.where(hit, repl.to(input_ids), input_ids)


def batch_generator(seed: int, step: int, sample_ids: torch.Tensor) -> torch.Generator:
    """A CPU generator determined by (seed, step, sample ids): the same micro-batch of a step, same draws."""
    key = repr((seed, step, sample_ids.tolist())).encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return gen


def corrupt_sequences(
    batch: Batch, rate: float, seed: int, step: int, vocab_size: int, replace_id: int | None = None
) -> torch.Tensor:
    """`input_ids` with each sequence's response inputs corrupted by its own (seed, step, sample id) draws.

    Sequence k of an SFT batch is unit k; it occupies one contiguous span of one row, so the draws cover
    exactly that span and do not depend on the batch layout.
    """
    ids, labels, seq = batch["input_ids"], batch["labels"], batch["seq_index"]
    out = ids.clone()
    for k, sid in enumerate(batch["sample_ids"]):
        rows, cols = (seq == k).nonzero(as_tuple=True)
        if not len(cols):
            continue
        r, a, b = int(rows[0]), int(cols.min()), int(cols.max()) + 2  # +1: the input after the last label
        gen = batch_generator(seed, step, sid.reshape(1))
        out[r, a:b] = corrupt(ids[r : r + 1, a:b], labels[r : r + 1, a:b], rate, gen, vocab_size, replace_id)[0]
    return out


@OBJECTIVES.register("masked_thought")
class MaskedThought(Objective):
    """Masked Thought: SFT with randomly corrupted response inputs (ramped rate), labels untouched."""

    Config = MaskedThoughtConfig
    batch_format = "sft"
    loss_items = "tokens"

    def _replacement(self, model: Any) -> tuple[int, int | None]:
        """(vocab size for random ids, fixed replacement id or None)."""
        cfg: MaskedThoughtConfig = self.cfg  # type: ignore[assignment]
        model = unwrap(model)  # under DDP the loop hands over the wrapper, which has no config or embeddings
        vocab = cfg.vocab_size or getattr(model.config, "vocab_size", None)
        vocab = vocab or model.get_input_embeddings().weight.shape[0]
        if cfg.replace == "random":
            return vocab, None
        mask_id = cfg.mask_token_id if cfg.mask_token_id is not None else getattr(model.config, "pad_token_id", None)
        if mask_id is None:
            raise ValueError("masked_thought replace=pad: set objective.mask_token_id (the model has no pad_token_id)")
        return vocab, int(mask_id)

    def loss(self, model: Any, batch: Batch, num_items: int, ref: Reference | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg: MaskedThoughtConfig = self.cfg  # type: ignore[assignment]
        rate = mask_rate(self.step, self.total_steps, cfg.max_rate, cfg.warmup_frac) if model.training else 0.0
        vocab, replace_id = self._replacement(model)
        if rate > 0:
            batch = {**batch, "input_ids": corrupt_sequences(batch, rate, cfg.seed, self.step, vocab, replace_id)}
        logits, labels = label_logits(model, batch)
        loss = sft_loss(logits, labels, num_items)
        return loss, {"tokens": float(labels.numel()), "mask_rate": rate}
