"""Execution feedback, for LeTI (Wang et al., "LeTI: Learning to Generate from Textual Interactions", arXiv
2305.10314): `prompt` + `attempt` + `feedback` + `reward` rows, one per sample of the model's own (`tunelab data
feedback` writes them). `reward` is true when the attempt passed all tests (a bool, 0/1, or the words
true/false); `feedback` is the execution feedback text (e.g. "failed: assertion failed at line 3"), may be empty
or null, and is used only when `reward` is false.

One unit = one sequence in the paper's layout: a conditioning prefix, then the problem and the attempt. The
prefix is the reward marker `<|good|>` / `<|bad|>`, then, on failures with feedback,
`<|lang_feedback|>` + feedback + `<|/lang_feedback|>`, then a newline. The prefix carries no loss (the paper's
non_feedback_mask): the model learns to produce the problem and solution conditioned on the reward/feedback
prefix, so at inference `<|good|>` can ask for a passing solution.

Rendering follows `data.template` (auto = chat when the tokenizer has a chat template):
- chat: the prefix opens the first user turn (prefix + prompt), the attempt is the assistant turn, and loss
  falls on the assistant turn only (with its end-of-turn token). The reference trains LM loss on problem +
  solution; for a chat model the closest is this: the problem text sits in the user turn, which a chat model
  never generates (training it to would teach the model to write user turns), and `tunelab eval` asks it for
  the assistant turn given the user turn, so the attempt is what is learnt, conditioned on prefix + problem;
- raw: the paper's exact layout, prefix + prompt + attempt + EOS as plain text, loss on the prompt and attempt
  tokens (system text, if any, gets none).

Deviations: the markers are plain text tokenised by the model's tokenizer, not new special tokens (the paper
adds tokens and resizes the embeddings). That needs no embedding resize, so every method, LoRA included, works
unchanged, at the cost of a few tokens per marker. The newline after the prefix is ours (readability; the
tokens are split there anyway). The batch adds `reward` [U] bool (whether each unit's attempt passed).
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.data.batching._base import (
    Batcher,
    EncodeContext,
    Unit,
    as_messages,
    encode_completion,
    prompt_of,
    register,
    require,
)
from tunelab.data.templating import IGNORE, Encoded
from tunelab.errors import UserError

GOOD, BAD = "<|good|>", "<|bad|>"
FEEDBACK_OPEN, FEEDBACK_CLOSE = "<|lang_feedback|>", "<|/lang_feedback|>"
_KEYS = ("prompt", "attempt", "feedback", "reward")
_WORDS = {"true": True, "1": True, "false": False, "0": False}


def prefix_text(reward: bool, feedback: str = "") -> str:
    """The conditioning prefix; `prefix_text(True)` is what reward-conditioned generation prepends."""
    span = f"{FEEDBACK_OPEN}{feedback}{FEEDBACK_CLOSE}" if not reward and feedback.strip() else ""
    return f"{GOOD if reward else BAD}{span}\n"


def _reward(value: Any, location: str) -> bool:
    """true/false, 0/1 (ints or floats), or the words true/false/1/0 (CSV and Parquet carry them as text)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _WORDS:
        return _WORDS[value.strip().lower()]
    raise UserError(f"{location}: 'reward' must be true (all tests passed) or false (0/1 also work), got {value!r}")


def _feedback(value: Any, location: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{location}: 'feedback' must be a string (the execution feedback; may be empty), got {type(value).__name__}")
    return value


def _with_prefix(prompt: list[dict[str, str]], prefix: str, location: str) -> list[dict[str, str]]:
    """The prompt with the prefix opening its first user turn."""
    first = next((i for i, m in enumerate(prompt) if m["role"] == "user"), None)
    if first is None:
        raise UserError(f"{location}: 'prompt' has no user turn to carry the reward marker")
    out = [dict(m) for m in prompt]
    out[first]["content"] = prefix + out[first]["content"]
    return out


def _encode_raw(ctx: EncodeContext, prefix: str, prompt: list[dict[str, str]], attempt: list[dict[str, str]]) -> Encoded:
    """prefix (no loss) + prompt + attempt + EOS as plain text, each piece tokenised on its own."""
    tok = ctx.tok
    ids = list(tok(prefix, add_special_tokens=True)["input_ids"])
    labels = [IGNORE] * len(ids)
    system = [{"role": "system", "content": ctx.cfg.system_prompt}] if ctx.cfg.system_prompt and prompt[0]["role"] != "system" else []
    for m in system + prompt + attempt:
        piece = list(tok(m["content"], add_special_tokens=False)["input_ids"])
        ids += piece
        labels += [IGNORE] * len(piece) if m["role"] == "system" else piece
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
        labels.append(tok.eos_token_id)
    return Encoded(ids, labels)


@register("feedback")
class FeedbackBatcher(Batcher):
    def encode(self, row: dict[str, Any], location: str, ctx: EncodeContext) -> Unit | str:
        require(row, _KEYS, location, "feedback")
        reward = _reward(row["reward"], location)
        prefix = prefix_text(reward, _feedback(row["feedback"], location))
        prompt = prompt_of(row, location)
        attempt = as_messages(row["attempt"], "assistant", location, "attempt")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in attempt):
            raise UserError(f"{location}: 'attempt' is empty (no assistant text to learn)")
        if ctx.template == "chat":
            seq = encode_completion(ctx, _with_prefix(prompt, prefix, location), attempt, location)
        else:
            seq = _encode_raw(ctx, prefix, prompt, attempt)
        return Unit([seq], {"reward": reward})

    def collate_meta(self, units: list[Unit]) -> dict[str, torch.Tensor]:
        return {"reward": torch.tensor([u.meta["reward"] for u in units], dtype=torch.bool)}
