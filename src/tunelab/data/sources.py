"""Read raw rows from files or `datasets`, each with a location string for error messages ("file:line")."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.errors import UserError

BUILTIN_DIR = Path(__file__).parent / "builtin"


def resolve(source: str) -> str:
    if source.startswith("builtin:"):
        path = BUILTIN_DIR / f"{source.split(':', 1)[1]}.jsonl"
        if not path.is_file():
            names = sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))
            raise UserError(f"unknown builtin dataset '{source}' (available: {', '.join('builtin:' + n for n in names)})")
        return str(path)
    return source


def read_rows(source: str, split: str = "train") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, row) pairs. Files by suffix; a directory is a saved `datasets` dataset; else hub id."""
    path = Path(resolve(source)).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        reader = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}.get(suffix)
        if reader is None:
            raise UserError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv or .parquet)")
        try:
            yield from reader(path)
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{_line_of(path, e.start)}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                            "save it as UTF-8, or check that this is the data file you meant") from None
        except csv.Error as e:
            raise UserError(f"{path}: malformed CSV ({e}); check quoting and that it is a text file") from None
    elif path.is_dir():
        yield from _saved_dataset(path, split)
    elif suffix in (".jsonl", ".json", ".csv", ".parquet") or source.startswith((".", "/", "~")):
        raise UserError(f"data file not found: {path}")
    else:
        yield from _hub_dataset(source, split)


def _line_of(path: Path, offset: int) -> int:
    """1-based line number of a byte offset in `path`."""
    with path.open("rb") as f:
        return f.read(offset).count(b"\n") + 1


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line; a bad line is a UserError naming file:line."""
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{i}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save it as UTF-8, "
                                "or check that this is the data file you meant") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno}); fix or remove line {i}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{i}: each line must be a JSON object, got {type(row).__name__}")
            yield i, row


def _jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for i, row in iter_jsonl(path):
        yield f"{path}:{i}", row


def _json(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); if it is JSON lines, name it .jsonl") from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a list of objects (or one key holding such a list)")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of objects")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{path}: item {i} is not an object")
        yield f"{path}[{i}]", row


def _csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f), 2):  # line 1 is the header
            yield f"{path}:{i}", dict(row)


def _parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:160]})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}[row {i}]", row


def _saved_dataset(path: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: a directory, but not a dataset saved with datasets' save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: no split '{split}' (has: {', '.join(ds)}); set data.split")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{path}[{split}][{i}]", row


def _hub_dataset(name: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    from tunelab.models import _hub_reachable

    if not _hub_reachable():
        raise UserError(f"data: '{name}' is not a local file or directory, and the Hugging Face hub is unreachable (offline)")
    ds = datasets.load_dataset(name, split=split)
    for i, row in enumerate(ds):
        yield f"{name}[{split}][{i}]", row
