"""The batcher contract, the `Unit` of data, and the collation every format shares.

Layout of a collated micro-batch of units: packed, the sequences of each row's units sit one after another
in the row (position ids restart per sequence, so no sequence attends to another); unpadded, every sequence
is its own right-padded row. Either way sequences are numbered unit by unit (`seq_index`), all of them go
through one forward pass, and `sample_ids` names each unit's index in its dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tunelab.data.formats import ROLES
from tunelab.data.packing import collate
from tunelab.data.templating import IGNORE, Encoded
from tunelab.errors import UserError


@dataclass
class Unit:
    """Sequences that train together (and are never split across micro-batches), with format metadata."""

    seqs: list[Encoded]
    meta: dict[str, Any] = field(default_factory=dict)
    sid: int = 0  # index in its dataset; keys precomputed reference log-probs

    @property
    def input_ids(self) -> list[int]:
        """All the unit's tokens as they lie in a packed row."""
        return [t for s in self.seqs for t in s.input_ids]

    @property
    def labels(self) -> list[int]:
        return [t for s in self.seqs for t in s.labels]


class Batcher:
    """Encodes rows of one data shape and collates units of it."""

    format: ClassVar[str]
    #: sequences must carry labels (False for prompt-only data, which is generated from, not scored)
    needs_labels: ClassVar[bool] = True

    def encode(self, row: dict[str, Any], location: str, ctx: EncodeContext) -> Unit | str:
        """A unit, or the name of the reason the row is dropped (counted and reported, not an error)."""
        raise NotImplementedError

    def finalize(self, units: list[Unit], ctx: EncodeContext) -> list[Unit]:
        """After all rows are encoded (cross-row construction such as KTO's mismatched KL pairs)."""
        return units

    def collate_meta(self, units: list[Unit]) -> dict[str, torch.Tensor]:
        """The format's own tensors for these units, in order."""
        return {}

    def collate(self, rows: list[list[Unit]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
        return collate_units(rows, pad_id, packed) | self.collate_meta([u for row in rows for u in row])


@dataclass
class EncodeContext:
    """What encoding needs besides the row: the tokenizer, the data config and the resolved template."""

    tok: Any
    cfg: Any  # DataConfig
    template: str
    state: dict[str, Any] = field(default_factory=dict)  # per-file memory, e.g. the row format seen first


BATCHERS: dict[str, Batcher] = {}


def register(fmt: str) -> Callable[[type[Batcher]], type[Batcher]]:
    def deco(cls: type[Batcher]) -> type[Batcher]:
        if fmt in BATCHERS:
            raise RuntimeError(f"batcher '{fmt}' registered twice")
        cls.format = fmt
        BATCHERS[fmt] = cls()
        return cls

    return deco


def get_batcher(fmt: str) -> Batcher:
    if fmt not in BATCHERS:
        raise NotImplementedError(f"no batcher for batch format '{fmt}' (have: {', '.join(sorted(BATCHERS))})")
    return BATCHERS[fmt]


def collate_units(rows: list[list[Unit]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Rows of units -> one batch (see the module docstring for the layout)."""
    units = [u for row in rows for u in row]
    if packed:
        seq_rows = [[s for u in row for s in u.seqs] for row in rows]
    else:
        seq_rows = [[s] for u in units for s in u.seqs]
    batch = collate(seq_rows, pad_id, packed)
    batch["sample_ids"] = torch.tensor([u.sid for u in units], dtype=torch.long)
    return batch


# ------------------------------------------------------------------------------------ shared row helpers


def as_messages(value: Any, role: str, location: str, key: str) -> list[dict[str, str]]:
    """A string (one `role` message) or a list of {role, content} messages."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{location}: field '{key}' is empty")
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value:
        out = []
        for j, m in enumerate(value):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(f"{location}: {key}[{j}] must be an object with a role ({sorted(ROLES)}) and string content")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    raise UserError(f"{location}: field '{key}' must be a non-empty string or a list of messages")


def require(row: dict[str, Any], keys: tuple[str, ...], location: str, fmt: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise UserError(
            f"{location}: missing field '{missing[0]}' for {fmt} data (rows need: {', '.join(keys)}; "
            f"found: {', '.join(sorted(row)) or 'nothing'})"
        )


def encode_completion(ctx: EncodeContext, prompt: list[dict[str, str]], completion: list[dict[str, str]], location: str) -> Encoded:
    """prompt + completion, loss on the completion's assistant turns only."""
    from tunelab.data.formats import Example
    from tunelab.data.templating import encode

    if not any(m["role"] == "assistant" and m["content"].strip() for m in completion):
        raise UserError(f"{location}: a response is empty (no assistant text to score)")
    msgs = list(prompt) + list(completion)
    if ctx.cfg.system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": ctx.cfg.system_prompt})
        first = len(prompt) + 1
    else:
        first = len(prompt)
    enc = encode(ctx.tok, Example(location, messages=msgs), template=ctx.template, loss_on="assistant", from_turn=first)
    labelled = [i for i, t in enumerate(enc.labels) if t != IGNORE]
    if labelled and labelled[0] >= ctx.cfg.max_length:
        raise UserError(
            f"{location}: the prompt alone is {labelled[0]} tokens, leaving no room under data.max_length={ctx.cfg.max_length}; "
            "raise data.max_length or shorten the prompt"
        )
    return enc


def prompt_of(row: dict[str, Any], location: str) -> list[dict[str, str]]:
    return as_messages(row["prompt"], "user", location, "prompt")
