"""LeTI (Wang, Peng, Jabbarvand, Ji, "LeTI: Learning to Generate from Textual Interactions", arXiv 2305.10314):
fine-tune on the model's own samples, each prefixed by its execution outcome, with the plain LM loss
L = -(1/N) * sum_t log p_theta(y_t | prefix, y_<t), where y = problem + solution and the prefix is the reward
marker `<|good|>` / `<|bad|>` plus, on failures, the textual feedback `<|lang_feedback|> ... <|/lang_feedback|>`
(the interpreter's error message). No gold solutions are needed, only tests. The loop is: sample solutions
(`tunelab data feedback`, which runs them in the sandbox), train with this objective, repeat (each iteration
is one data build + one `tunelab train`, not automated here). Data: batch format "feedback" (see
data/batching/feedback.py for the layout). Loss: the SFT token loss (`sft_loss`), N = label tokens in the whole
optimizer step, so gradient accumulation equals one big batch. The paper's coarse-grained ablation (binary
marker, no text) is a data choice: `tunelab data feedback --coarse`. No config fields beyond `name`; the
paper's optimiser settings (constant lr 5e-6 for 2B, 1e-5 for 350M, weight decay 0.01, 3 epochs per
iteration) belong to `train`.
Deviations: the markers are plain text, not new special tokens (no embedding resize, so LoRA and every other
method work unchanged); with a chat template the prefix + problem form the user turn and loss falls on the
attempt only (the paper, on raw text, also trains the problem tokens; raw mode here does too); MBPP's heuristic
post-processing hint (extra code after the first function) and the pretraining-data mixing are not
implemented. Reward-conditioned generation at inference (prepending `<|good|>`, i.e.
`data.batching.feedback.prefix_text(True)`, to the prompt) is not wired into `tunelab eval` yet: evaluating a
LeTI run with plain prompts measures the model without the conditioning the paper uses.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from tunelab.objectives import OBJECTIVES
from tunelab.objectives._base import Batch, Objective
from tunelab.objectives._logprobs import label_logits
from tunelab.objectives.sft import sft_loss


class LeTIConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["leti"] = "leti"


@OBJECTIVES.register("leti")
class LeTI(Objective):
    """LeTI: LM loss on the model's own solutions conditioned on their execution outcome and feedback."""

    Config = LeTIConfig
    batch_format = "feedback"
    loss_items = "tokens"


    def loss(self, model: Any, batch: Batch, num_items: int, ref: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
        logits, labels = label_logits(model, batch)
        loss = sft_loss(logits, labels, num_items)
        good = float(batch["reward"].float().mean())  # a batch always holds at least one unit
        return loss, {"tokens": float(labels.numel()), "good_fraction": good}
