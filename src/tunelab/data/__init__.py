"""Data stage: read rows -> canonical examples -> token ids + loss masks (cached) -> packed batches."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.config import DataConfig
from tunelab.data.formats import detect_format, to_example
from tunelab.data.packing import collate, pack
from tunelab.data.sources import read_rows, resolve
from tunelab.data.templating import IGNORE, Encoded, encode, resolve_template
from tunelab.errors import UserError

CACHE_VERSION = 1


@dataclass
class TokenizedSet:
    samples: list[Encoded]
    source: str
    dropped_too_long: int = 0
    dropped_no_labels: int = 0
    truncated: int = 0
    rows: int = 0

    @property
    def label_tokens(self) -> int:
        return sum(sum(1 for x in s.labels if x != IGNORE) for s in self.samples)


def _fingerprint(source: str, tok: Any, cfg: DataConfig, split: str) -> str:
    h = hashlib.sha256()
    path = Path(resolve(source)).expanduser()
    if path.is_file():
        st = path.stat()
        h.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    else:
        h.update(source.encode())
    vocab = json.dumps(sorted(tok.get_vocab().items()), separators=(",", ":"))
    h.update(hashlib.sha256(vocab.encode()).digest())
    h.update(str(getattr(tok, "chat_template", "")).encode())
    keys = ("format", "template", "system_prompt", "loss_on", "max_length", "truncation", "limit")
    h.update(json.dumps({k: getattr(cfg, k) for k in keys} | {"split": split, "v": CACHE_VERSION}).encode())
    return h.hexdigest()[:24]


def _tokenize(source: str, tok: Any, cfg: DataConfig, split: str) -> TokenizedSet:
    template = resolve_template(tok, cfg.template)
    out = TokenizedSet([], source)
    fmt = None if cfg.format == "auto" else cfg.format
    for location, row in read_rows(source, split):
        if cfg.limit is not None and out.rows >= cfg.limit:
            break
        fmt = fmt or detect_format(row, location)
        enc = encode(tok, to_example(row, fmt, location, cfg.system_prompt), template=template, loss_on=cfg.loss_on)
        out.rows += 1
        if len(enc.input_ids) > cfg.max_length:
            if cfg.truncation == "drop":
                out.dropped_too_long += 1
                continue
            enc = Encoded(enc.input_ids[: cfg.max_length], enc.labels[: cfg.max_length])
            out.truncated += 1
        if all(x == IGNORE for x in enc.labels[1:]):  # the first label can never be predicted
            out.dropped_no_labels += 1
            continue
        out.samples.append(enc)
    if out.rows == 0:
        raise UserError(f"{source}: the dataset is empty")
    if not out.samples:
        raise UserError(
            f"{source}: all {out.rows} samples are unusable ({out.dropped_too_long} longer than data.max_length="
            f"{cfg.max_length}, {out.dropped_no_labels} with no tokens to learn); raise data.max_length"
        )
    return out


def tokenize_cached(source: str, tok: Any, cfg: DataConfig, split: str = "train") -> TokenizedSet:
    """Tokenize once per (file, tokenizer, data settings); a re-run or resume reads the cache."""
    from tunelab.models.presets import cache_dir

    path = cache_dir() / "data" / f"{_fingerprint(source, tok, cfg, split)}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=False)
        except Exception:
            path.unlink(missing_ok=True)  # corrupt cache: rebuild
    out = _tokenize(source, tok, cfg, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(out, tmp)
    os.replace(tmp, path)
    return out


def split_valid(ts: TokenizedSet, size: float, seed: int) -> tuple[list[Encoded], list[Encoded]]:
    n = len(ts.samples)
    k = int(round(size * n)) if size < 1 else int(size)
    k = min(k, n - 1)
    if k <= 0:
        return ts.samples, []
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:k])
    return [s for i, s in enumerate(ts.samples) if i not in held], [ts.samples[i] for i in sorted(held)]


@dataclass
class Batches:
    """Rows of samples, shuffled per epoch with a seeded generator, so a (epoch, index) position resumes exactly."""

    samples: list[Encoded]
    batch_size: int
    max_length: int
    packed: bool
    pad_id: int
    seed: int = 0
    shuffle: bool = True
    rows: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        lengths = [len(s.input_ids) for s in self.samples]
        self.rows = pack(lengths, self.max_length) if self.packed else [[i] for i in range(len(lengths))]

    def __len__(self) -> int:
        return (len(self.rows) + self.batch_size - 1) // self.batch_size

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        return torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def batch(self, epoch: int, index: int, order: list[int] | None = None) -> dict[str, torch.Tensor]:
        order = order if order is not None else self.order(epoch)
        chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
        return collate([[self.samples[i] for i in self.rows[r]] for r in chosen], self.pad_id, self.packed)

    def __iter__(self):  # one pass in fixed order (validation)
        order = self.order(0)
        for i in range(len(self)):
            yield self.batch(0, i, order)


@dataclass
class DataBundle:
    train: Batches
    valid: Batches | None
    stats: dict[str, Any]


def build_data(cfg: DataConfig, tok: Any, batch_size: int, seed: int) -> DataBundle:
    if not cfg.train:
        raise UserError("data.train is not set: give a JSONL/JSON/CSV/Parquet file, a saved dataset dir or builtin:NAME")
    train = tokenize_cached(cfg.train, tok, cfg, cfg.split)
    if cfg.valid:
        train_s, valid_s = train.samples, tokenize_cached(cfg.valid, tok, cfg, "validation").samples
    else:
        train_s, valid_s = split_valid(train, cfg.valid_size, seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tb = Batches(train_s, batch_size, cfg.max_length, cfg.packing, pad, seed)
    vb = Batches(valid_s, batch_size, cfg.max_length, cfg.packing, pad, seed, shuffle=False) if valid_s else None
    stats = {
        "rows": train.rows, "train_samples": len(train_s), "valid_samples": len(valid_s),
        "dropped_too_long": train.dropped_too_long, "dropped_no_labels": train.dropped_no_labels,
        "truncated": train.truncated, "train_rows": len(tb.rows),
        "train_tokens": sum(len(s.input_ids) for s in train_s),
        "train_label_tokens": sum(sum(1 for x in s.labels if x != IGNORE) for s in train_s),
    }
    return DataBundle(tb, vb, stats)
