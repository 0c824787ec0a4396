"""Data stage: read rows -> canonical examples -> token ids + loss masks (cached) -> packed batches."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tunelab.config import DataConfig
from tunelab.data.batching import Batcher, Unit, get_batcher
from tunelab.data.batching._base import EncodeContext
from tunelab.data.packing import pack
from tunelab.data.sources import read_rows, resolve
from tunelab.data.templating import IGNORE, Encoded, resolve_template
from tunelab.errors import UserError

CACHE_VERSION = 3  # 3: an assistant-first conversation's template preamble is no longer labelled


@dataclass
class TokenizedSet:
    samples: list[Unit]
    source: str
    dropped_too_long: int = 0
    dropped_no_labels: int = 0
    truncated: int = 0
    rows: int = 0
    dropped_other: dict[str, int] = field(default_factory=dict)  # batcher reasons, e.g. identical_pair

    @property
    def label_tokens(self) -> int:
        return sum(sum(1 for x in s.labels if x != IGNORE) for s in self.samples)


def _fingerprint(source: str, tok: Any, cfg: DataConfig, split: str, batch_format: str) -> str:
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
    h.update(str(tok("a b")["input_ids"]).encode())  # the special tokens it adds (a BOS or not) change the units
    # the whole data config: a new field can never silently reuse a stale cache
    settings = cfg.model_dump(mode="json") | {"split": split, "batch_format": batch_format, "v": CACHE_VERSION}
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(_encoding_code())
    return h.hexdigest()[:24]


@functools.cache
def _encoding_code() -> bytes:
    """The source of the code that turns rows into units: an upgraded (or edited) tunelab never reads units that
    an older encoder wrote, without anyone having to remember to bump CACHE_VERSION."""
    root = Path(__file__).parent
    files = sorted([*root.glob("*.py"), *(root / "batching").glob("*.py")])
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).digest()


def _fit_length(unit: Unit, cfg: DataConfig, out: TokenizedSet) -> Unit | None:
    """Apply data.truncation to every sequence of a unit; None when the unit is dropped (counted)."""
    if any(len(s.input_ids) > cfg.max_length for s in unit.seqs):
        if cfg.truncation == "drop":
            out.dropped_too_long += 1
            return None
        unit.seqs = [Encoded(s.input_ids[: cfg.max_length], s.labels[: cfg.max_length]) for s in unit.seqs]
        out.truncated += 1
    return unit


def tokenize(source: str, tok: Any, cfg: DataConfig, split: str, batch_format: str = "sft") -> TokenizedSet:
    batcher = get_batcher(batch_format)
    ctx = EncodeContext(tok, cfg, resolve_template(tok, cfg.template))
    out = TokenizedSet([], source)
    for location, row in read_rows(source, split):
        if cfg.limit is not None and out.rows >= cfg.limit:
            break
        unit = batcher.encode(row, location, ctx)
        out.rows += 1
        if isinstance(unit, str):
            out.dropped_other[unit] = out.dropped_other.get(unit, 0) + 1
            continue
        unit = _fit_length(unit, cfg, out)
        if unit is None:
            continue
        # the first label can never be predicted, so a sequence needs one after it
        if batcher.needs_labels and any(all(x == IGNORE for x in s.labels[1:]) for s in unit.seqs):
            out.dropped_no_labels += 1
            continue
        unit.sid = len(out.samples)
        out.samples.append(unit)
    if out.rows == 0:
        raise UserError(f"{source}: the dataset is empty")
    if not out.samples:
        other = "".join(f", {n} {why.replace('_', ' ')}" for why, n in out.dropped_other.items())
        raise UserError(
            f"{source}: all {out.rows} samples are unusable ({out.dropped_too_long} longer than data.max_length="
            f"{cfg.max_length}, {out.dropped_no_labels} with no tokens to learn{other}); raise data.max_length"
        )
    out.samples = batcher.finalize(out.samples, ctx)
    return out


def tokenize_cached(source: str, tok: Any, cfg: DataConfig, split: str = "train", batch_format: str = "sft") -> TokenizedSet:
    """Tokenize once per (file, tokenizer, data settings, batch format, encoder code); a re-run or resume reads the
    cache. TUNELAB_DATA_CACHE=0 turns the cache off (every run encodes afresh; mutation testing of the encoders)."""
    from tunelab.models.presets import cache_dir

    if os.environ.get("TUNELAB_DATA_CACHE", "1") == "0":
        return tokenize(source, tok, cfg, split, batch_format)

    path = cache_dir() / "data" / f"{_fingerprint(source, tok, cfg, split, batch_format)}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=False)
        except Exception:
            path.unlink(missing_ok=True)  # corrupt cache: rebuild
    out = tokenize(source, tok, cfg, split, batch_format)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(out, tmp)
    os.replace(tmp, path)
    return out


def split_valid(ts: TokenizedSet, size: float, seed: int) -> tuple[list[Unit], list[Unit]]:
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
    """Rows of units, shuffled per epoch with a seeded generator, so a (epoch, index) position resumes exactly.

    `batch_size` counts rows: packed rows of whole units (capacity max_length per sequence of the widest
    unit, so a pair's row holds 2 x max_length), or single units.

    `batch_tokens` (instead of `batch_size`) sizes micro-batches by their padded tensor: rows sorted by width are
    grouped so that tensor rows x the widest row <= batch_tokens, which bounds activation memory by construction
    and keeps padding low (rows of similar length train together). The groups are fixed; their order is shuffled
    per epoch. A single row wider than the budget forms its own micro-batch.
    """

    samples: list[Unit]
    batch_size: int
    max_length: int
    packed: bool
    pad_id: int
    seed: int = 0
    shuffle: bool = True
    batcher: Batcher = field(default_factory=lambda: get_batcher("sft"))
    batch_tokens: int | None = None
    rows: list[list[int]] = field(init=False)
    groups: list[list[int]] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        lengths = [len(s.input_ids) for s in self.samples]
        width = max((len(s.seqs) for s in self.samples), default=1)
        self.rows = pack(lengths, self.max_length * width) if self.packed else [[i] for i in range(len(lengths))]
        if self.batch_tokens is not None:
            self.groups = token_groups([self.row_shape(r) for r in self.rows], self.batch_tokens)

    def row_shape(self, row: list[int]) -> tuple[int, int]:
        """(tensor rows, width) a row of units occupies once collated: packed, one row holding every sequence;
        unpacked, one tensor row per sequence of its unit (a pair's chosen and rejected), as wide as the longest."""
        units = [self.samples[i] for i in row]
        if self.packed:
            return 1, sum(len(u.input_ids) for u in units)
        return sum(len(u.seqs) for u in units), max(len(s.input_ids) for u in units for s in u.seqs)

    def _count(self) -> int:
        return len(self.groups) if self.groups is not None else len(self.rows)

    def __len__(self) -> int:
        if self.groups is not None:
            return len(self.groups)
        return (len(self.rows) + self.batch_size - 1) // self.batch_size

    def order(self, epoch: int) -> list[int]:
        """A permutation of the rows (of the token groups with `batch_tokens`) for this epoch."""
        if not self.shuffle:
            return list(range(self._count()))
        return torch.randperm(self._count(), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def batch(self, epoch: int, index: int, order: list[int] | None = None) -> dict[str, torch.Tensor]:
        order = order if order is not None else self.order(epoch)
        if self.groups is not None:
            chosen = self.groups[order[index]]
        else:
            chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.batcher.collate([[self.samples[i] for i in self.rows[r]] for r in chosen], self.pad_id, self.packed)

    def __iter__(self):  # one pass in fixed order (validation)
        order = self.order(0)
        for i in range(len(self)):
            yield self.batch(0, i, order)


def token_groups(shapes: list[tuple[int, int]], budget: int) -> list[list[int]]:
    """Indices grouped, widest first, so that each group's (sum of tensor rows) x (widest) <= budget."""
    order = sorted(range(len(shapes)), key=lambda i: (-shapes[i][1], i))
    groups: list[list[int]] = []
    n_rows, width = 0, 0
    for i in order:
        rows, w = shapes[i]
        if groups and (n_rows + rows) * max(width, w) <= budget:
            groups[-1].append(i)
            n_rows, width = n_rows + rows, max(width, w)
        else:
            groups.append([i])
            n_rows, width = rows, w
    return groups


@dataclass
class DataBundle:
    train: Batches | None  # None in an online run until its first round of rollouts (train/rollouts.py)
    valid: Batches | None
    stats: dict[str, Any]


def build_data(cfg: DataConfig, tok: Any, batch_size: int, seed: int, batch_format: str = "sft",
               batch_tokens: int | None = None, *, online: bool = False) -> DataBundle:
    """Tokenised, batched train (and validation) data in the shape the objective declared; `batch_tokens`
    sizes micro-batches by tokens instead of rows (see Batches). `online`: the objective trains on rollouts drawn
    during training (train/rollouts.py), so there is no training set here, only `data.valid` if given."""
    if online:
        return _online_data(cfg, tok, batch_size, seed, batch_format, batch_tokens)
    if not cfg.train:
        raise UserError("data.train is not set: give a JSONL/JSON/CSV/Parquet file, a saved dataset dir or builtin:NAME")
    train = tokenize_cached(cfg.train, tok, cfg, cfg.split, batch_format)
    if cfg.valid:
        train_s = train.samples
        # sample ids key reference log-probs, so validation units continue the numbering
        valid_s = [replace(u, sid=len(train_s) + u.sid) for u in tokenize_cached(cfg.valid, tok, cfg, "validation", batch_format).samples]
    else:
        train_s, valid_s = split_valid(train, cfg.valid_size, seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batcher = get_batcher(batch_format)
    tb = Batches(train_s, batch_size, cfg.max_length, cfg.packing, pad, seed, batcher=batcher, batch_tokens=batch_tokens)
    vb = (Batches(valid_s, batch_size, cfg.max_length, cfg.packing, pad, seed, shuffle=False, batcher=batcher, batch_tokens=batch_tokens)
          if valid_s else None)
    stats = {
        "rows": train.rows, "train_samples": len(train_s), "valid_samples": len(valid_s),
        "dropped_too_long": train.dropped_too_long, "dropped_no_labels": train.dropped_no_labels,
        "truncated": train.truncated, "train_rows": len(tb.rows), "train_micro_batches": len(tb),
        "train_tokens": sum(len(s.input_ids) for s in train_s),
        "train_label_tokens": sum(sum(1 for x in s.labels if x != IGNORE) for s in train_s),
        "batch_format": batch_format, **{f"dropped_{k}": v for k, v in train.dropped_other.items()},
    }
    return DataBundle(tb, vb, stats)


def _online_data(cfg: DataConfig, tok: Any, batch_size: int, seed: int, batch_format: str, batch_tokens: int | None) -> DataBundle:
    if cfg.train:
        raise UserError("data.train is set, but objective.online draws the training rows from the model during training: "
                        "remove data.train (data.valid may name validation rows in the objective's format)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    valid = tokenize_cached(cfg.valid, tok, cfg, "validation", batch_format).samples if cfg.valid else []
    vb = (Batches(valid, batch_size, cfg.max_length, cfg.packing, pad, seed, shuffle=False, batcher=get_batcher(batch_format),
                  batch_tokens=batch_tokens) if valid else None)
    return DataBundle(None, vb, {"train_source": "online rollouts", "valid_samples": len(valid), "batch_format": batch_format})
