"""DePT: Decomposed Prompt Tuning (Shi & Lipani, ICLR 2024, arXiv 2309.05173).

A shorter soft prompt plus a low-rank, position-wise offset on the frozen input embeddings, at the budget of
a longer prompt:

    E'(x)[t] = E(x)[t] + c * (A B)[t]   for positions t < s (no offset beyond),   c = alpha / sqrt(r)
    X'       = [P ; E'(x)]  -> frozen model,   P in R^{m x d}, A in R^{s x r}, B in R^{r x d}

A is Kaiming-uniform, B zero (so at init only the prompt changes the outputs), P from the embeddings of
random vocabulary tokens (seeded) or random normal entries at the embeddings' RMS.
Trainable parameters: m * d + s * r + r * d.

Defaults and where they come from:
- r = 30, alpha = 8, s = 256: the paper's (its budget example: T5-base, l = 100 <=> m = 60, r = 30).
- m = 20 (ours, not the paper's 60): in a decoder every prompt vector is an extra position in every training
  row and in the KV cache of every generated token, with no separate encoder pass to absorb it; the paper's
  own point is that a shorter prompt saves that time, and the offset (r = 30) keeps the capacity.
- Two learning rates (the paper's separate AdamW groups): `prompt_lr` default 0.3 x the RMS of the model's
  embedding entries. The paper's prompt lr 3e-1 was tuned on T5, whose embeddings start at std 1.0; decoder
  LMs start theirs at ~0.02 and Adam moves an entry by about the lr per step, so the lr is carried over
  relative to the embedding scale (6e-3 at 0.02). `offset_lr` default the run's lr (2e-4 by default, a
  LoRA-like rate for low-rank factors; the paper's T5 grid 5e-4 / 5e-3 / 3e-1 is higher, but the same
  embedding-scale argument points lower for decoder LMs). The prompt has no weight decay (ours: decay would
  pull it towards the origin, off the embedding scale); A and B take the run's weight decay (the paper: 1e-5).

Deviations from the paper:
- Decoder-only: the offset is added at every token position t < s of the sequence, prompt and response alike,
  in training and in generation (each generated token gets its position's offset), so the two agree. The
  paper (encoder-decoder) adds it to the encoder input only, which it pads to exactly s tokens.
- Positions count real tokens (padding excluded), so a left-padded row in generation and a right-padded
  row in training give a token the same offset; the paper pads every input to length s instead.
- Packed rows are not supported (the prompt would precede only the first sample of a row).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict

from tunelab.methods import METHODS
from tunelab.methods._softprompt import PromptSource, SoftPromptFields, SoftPromptMethod


class DePTConfig(SoftPromptFields):
    model_config = ConfigDict(extra="forbid")
    name: Literal["dept"] = "dept"


@METHODS.register("dept")
class DePT(SoftPromptMethod):
    """DePT: a short soft prompt plus a low-rank position-wise offset on the input embeddings (two learning rates)."""

    Config = DePTConfig

    def build_source(self, model: torch.nn.Module, prompt: torch.Tensor, gen: torch.Generator) -> PromptSource:
        cfg: DePTConfig = self.cfg  # type: ignore[assignment]
        return PromptSource(prompt, cfg.offset_positions, cfg.r, cfg.alpha, gen)

    def expected_trainable(self, model: torch.nn.Module) -> int:
        """m * d + s * r + r * d."""
        return self.dept_count(model)
