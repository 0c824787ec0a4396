"""Render examples to token ids with a loss mask.

Chat mode renders with the tokenizer's chat template and labels exactly the characters that each assistant
turn adds (found by rendering the conversation prefix with and without that turn), including the template's
end-of-turn token, so the model learns to stop. Raw mode concatenates the contents and appends EOS.
A template that rewrites earlier turns (so a prefix does not render as a prefix) is refused, not guessed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tunelab.data.formats import Example
from tunelab.errors import UserError

IGNORE = -100

# used only for tokenizers that have no chat template of their own
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss; unshifted (label t is the token at t)


def has_chat_template(tok: Any) -> bool:
    return bool(getattr(tok, "chat_template", None))


def render(tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    template = None if has_chat_template(tok) else FALLBACK_TEMPLATE
    return tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def _assistant_spans(tok: Any, ex: Example, loss_on: str, from_turn: int) -> tuple[str, list[tuple[int, int]]]:
    msgs = ex.messages or []
    full = render(tok, msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or i < from_turn:
            continue
        upto = render(tok, msgs[: i + 1])
        before = render(tok, msgs[:i], add_generation_prompt=True) if i else _opening(tok, m, upto)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise UserError(
                f"{ex.location}: the model's chat template renders earlier turns differently once later turns are "
                "added, so assistant tokens cannot be located; set data.template=raw or data.loss_on=all"
            )
        end = len(upto.rstrip())  # keep the end-of-turn token, not the newline after it
        spans.append((len(before), end))
    if loss_on == "last_turn":
        spans = spans[-1:]
    return full, spans


def _opening(tok: Any, first: dict[str, str], upto: str) -> str:
    """What a template writes before a conversation's first message when that message is the assistant's (a
    default system prompt, the assistant header): not the model's to learn. A template cannot render an empty
    conversation, so it is what the turn renders to with and without its content in common."""
    return os.path.commonprefix([render(tok, [{**first, "content": ""}]), upto])


def _encode_chat(tok: Any, ex: Example, loss_on: str, from_turn: int) -> Encoded:
    text, spans = _assistant_spans(tok, ex, loss_on, from_turn)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if loss_on == "all":
        return Encoded(ids, list(ids))
    labels = [IGNORE] * len(ids)
    for k, (s, e) in enumerate(enc["offset_mapping"]):
        if any(s < b and e > a for a, b in spans):
            labels[k] = ids[k]
    return Encoded(ids, labels)


def _encode_raw(tok: Any, ex: Example, loss_on: str, from_turn: int) -> Encoded:
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if ex.text is not None:
        ids = tok(ex.text, add_special_tokens=True)["input_ids"] + eos
        return Encoded(ids, list(ids))
    ids: list[int] = []
    labels: list[int] = []
    msgs = ex.messages or []
    last_assistant = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    for i, m in enumerate(msgs):
        piece = tok(m["content"], add_special_tokens=(i == 0))["input_ids"]
        if m["role"] == "assistant":
            piece = piece + eos
        learn = loss_on == "all" or (m["role"] == "assistant" and (loss_on == "assistant" or i == last_assistant))
        learn = learn and i >= from_turn
        ids += piece
        labels += piece if learn else [IGNORE] * len(piece)
    return Encoded(ids, labels)


def encode(tok: Any, ex: Example, *, template: str, loss_on: str, from_turn: int = 0) -> Encoded:
    """Token ids + labels. `from_turn`: only turns at or after this message index carry loss (a preference
    pair's completion after its shared prompt)."""
    if ex.text is None and template == "chat":
        return _encode_chat(tok, ex, loss_on, from_turn)
    return _encode_raw(tok, ex, loss_on, from_turn)


def resolve_template(tok: Any, template: str) -> str:
    if template == "auto":
        return "chat" if has_chat_template(tok) else "raw"
    return template
