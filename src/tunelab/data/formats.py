"""Canonical examples: every supported row format becomes a conversation (list of messages) or plain text.

Formats: chat `messages` (also ShareGPT `conversations` with from/value), `prompt`/`completion`, alpaca
(`instruction`/`input`/`output`), plain `text`. Extra keys in a row are ignored (ids, metadata).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.errors import UserError

ROLES = {"system", "user", "assistant", "tool"}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}

FORMAT_KEYS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


@dataclass
class Example:
    """One training sample: `messages` for conversations, or `text` for plain language modelling."""

    location: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None


def detect_format(row: dict[str, Any], location: str) -> str:
    if "conversations" in row:
        return "messages"
    for fmt, keys in FORMAT_KEYS.items():
        if all(k in row for k in keys):
            return fmt
    raise UserError(
        f"{location}: cannot tell the data format from keys {sorted(row)}; expected one of: "
        "messages, prompt+completion, instruction+output (alpaca), text (or set data.format)"
    )


def _field(row: dict[str, Any], key: str, location: str) -> str:
    if key not in row:
        raise UserError(f"{location}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"{location}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _messages(row: dict[str, Any], location: str) -> list[dict[str, str]]:
    raw = row.get("messages", row.get("conversations"))
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{location}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict):
            raise UserError(f"{location}: messages[{j}] must be an object with role and content")
        role = m.get("role", _SHAREGPT_ROLES.get(m.get("from", ""), m.get("from")))
        content = m.get("content", m.get("value"))
        if role not in ROLES:
            raise UserError(f"{location}: messages[{j}] has unknown role {role!r} (use one of {sorted(ROLES)})")
        if not isinstance(content, str):
            raise UserError(f"{location}: messages[{j}] needs a string 'content'")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{location}: conversation has no assistant message, so nothing to learn from")
    return out


def to_example(row: dict[str, Any], fmt: str, location: str, system_prompt: str | None = None) -> Example:
    if fmt == "text":
        return Example(location, text=_field(row, "text", location))
    if fmt == "messages":
        messages = _messages(row, location)
    elif fmt == "prompt_completion":
        messages = [
            {"role": "user", "content": _field(row, "prompt", location)},
            {"role": "assistant", "content": _field(row, "completion", location)},
        ]
    elif fmt == "alpaca":
        instruction = _field(row, "instruction", location)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise UserError(f"{location}: field 'input' must be a string")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _field(row, "output", location)}]
        if isinstance(row.get("system"), str) and row["system"]:
            messages.insert(0, {"role": "system", "content": row["system"]})
    else:
        raise UserError(f"unknown data format '{fmt}'")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Example(location, messages=messages)
