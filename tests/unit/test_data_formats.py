"""Data sources and the tokenisation stage: file types, one clear error per mistake, truncation, the cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import chat_rows

from tunelab.config import DataConfig
from tunelab.data import build_data, split_valid, tokenize_cached
from tunelab.data.sources import read_rows
from tunelab.data.templating import IGNORE
from tunelab.errors import UserError

PC_ROWS = [{"prompt": f"Return {i}.", "completion": f"return {i}", "id": i} for i in range(5)]


def dcfg(path: Path | str, **kw: Any) -> DataConfig:
    return DataConfig(train=str(path), **kw)


def single_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ sources


def test_jsonl_source_yields_locations_with_line_numbers(jsonl: Any) -> None:
    path = jsonl([PC_ROWS[0], "", PC_ROWS[1]])  # blank lines are skipped but still counted
    rows = list(read_rows(str(path)))
    assert [loc for loc, _ in rows] == [f"{path}:1", f"{path}:3"]
    assert rows[1][1] == PC_ROWS[1]


def test_csv_json_parquet_sources_give_the_same_rows(tmp_path: Path) -> None:
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in PC_ROWS]
    with (tmp_path / "d.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "completion"])
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"train": rows}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.csv", "d.json", "wrapped.json", "d.parquet"):
        got = [r for _, r in read_rows(str(tmp_path / name))]
        assert got == rows, name
    assert next(read_rows(str(tmp_path / "d.csv")))[0].endswith("d.csv:2")  # header is line 1


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet", ".jsonl"])
def test_every_file_type_tokenizes_the_same(tmp_path: Path, tok: Any, suffix: str) -> None:
    import pandas as pd

    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in PC_ROWS]
    path = tmp_path / f"d{suffix}"
    df = pd.DataFrame(rows)
    {".csv": lambda: df.to_csv(path, index=False), ".json": lambda: df.to_json(path, orient="records"),
     ".parquet": lambda: df.to_parquet(path), ".jsonl": lambda: df.to_json(path, orient="records", lines=True)}[suffix]()
    ts = tokenize_cached(str(path), tok, dcfg(path))
    assert ts.rows == 5 and len(ts.samples) == 5
    decoded = [tok.decode([t for t in s.labels if t != IGNORE]) for s in ts.samples]
    assert decoded == [f"return {i}<|im_end|>" for i in range(5)]


def test_saved_dataset_directory(tmp_path: Path, tok: Any) -> None:
    import datasets

    datasets.Dataset.from_list(PC_ROWS).save_to_disk(str(tmp_path / "ds"))
    ts = tokenize_cached(str(tmp_path / "ds"), tok, dcfg(tmp_path / "ds"))
    assert len(ts.samples) == 5


def test_unsupported_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported file type '.txt'"):
        list(read_rows(str(tmp_path / "d.txt")))
    with pytest.raises(UserError, match="data file not found"):
        list(read_rows(str(tmp_path / "missing.jsonl")))
    with pytest.raises(UserError, match="unknown builtin dataset 'builtin:nope'"):
        list(read_rows("builtin:nope"))


def test_hub_dataset_name_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="unreachable"):
        list(read_rows("someorg/somedata"))


# ------------------------------------------------------------------------------------------ errors


def test_malformed_jsonl_line_7_names_file_and_line(jsonl: Any, tok: Any) -> None:
    lines: list[Any] = [*chat_rows(6), '{"messages": [{"role": "user", "content": "x"}', *chat_rows(2)]
    path = jsonl(lines, "broken.jsonl")
    with pytest.raises(UserError) as e:
        tokenize_cached(str(path), tok, dcfg(path))
    msg = single_line(e)
    assert f"{path}:7" in msg and "line 7" in msg


def test_non_object_line_is_an_error(jsonl: Any) -> None:
    path = jsonl([PC_ROWS[0], "[1, 2]"])
    with pytest.raises(UserError, match=r":2: each line must be a JSON object"):
        list(read_rows(str(path)))


def test_missing_field_names_file_line_and_field(jsonl: Any, tok: Any) -> None:
    path = jsonl([PC_ROWS[0], {"prompt": "only a prompt"}])
    with pytest.raises(UserError) as e:
        tokenize_cached(str(path), tok, dcfg(path, format="prompt_completion"))
    msg = single_line(e)
    assert f"{path}:2" in msg and "missing field 'completion'" in msg


def test_undetectable_format_lists_the_formats(jsonl: Any, tok: Any) -> None:
    path = jsonl([{"question": "q", "answer": "a"}])
    with pytest.raises(UserError) as e:
        tokenize_cached(str(path), tok, dcfg(path))
    assert f"{path}:1" in single_line(e) and "prompt+completion" in str(e.value)


def test_unknown_role_names_the_message(jsonl: Any, tok: Any) -> None:
    rows = [*chat_rows(2), {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}]
    path = jsonl(rows)
    with pytest.raises(UserError) as e:
        tokenize_cached(str(path), tok, dcfg(path))
    msg = single_line(e)
    assert f"{path}:3" in msg and "messages[1]" in msg and "'robot'" in msg


def test_conversation_without_assistant_is_an_error(jsonl: Any, tok: Any) -> None:
    path = jsonl([{"messages": [{"role": "user", "content": "a"}]}])
    with pytest.raises(UserError, match="no assistant message"):
        tokenize_cached(str(path), tok, dcfg(path))


def test_empty_dataset(jsonl: Any, tok: Any) -> None:
    path = jsonl(["", "  "])
    with pytest.raises(UserError) as e:
        tokenize_cached(str(path), tok, dcfg(path))
    assert single_line(e) == f"{path}: the dataset is empty"


def test_every_sample_too_long(jsonl: Any, tok: Any) -> None:
    path = jsonl(chat_rows(3))
    with pytest.raises(UserError) as e:
        tokenize_cached(str(path), tok, dcfg(path, max_length=16))
    msg = single_line(e)
    assert "all 3 samples are unusable" in msg and "3 longer than data.max_length=16" in msg


def test_missing_train_source(tok: Any) -> None:
    with pytest.raises(UserError, match="data.train is not set"):
        build_data(DataConfig(), tok, 2, 0)


# ------------------------------------------------------------------------------------------ truncation


def _lengths(tok: Any, path: Path) -> list[int]:
    return [len(s.input_ids) for s in tokenize_cached(str(path), tok, dcfg(path, max_length=4096)).samples]


def test_truncation_drop_vs_truncate(jsonl: Any, tok: Any) -> None:
    long_answer = "x = 1\n" * 60
    rows = [*chat_rows(2), {"messages": [{"role": "user", "content": "long"}, {"role": "assistant", "content": long_answer}]}]
    path = jsonl(rows)
    lengths = _lengths(tok, path)
    cap = max(lengths[:2]) + 5
    assert lengths[2] > cap

    dropped = tokenize_cached(str(path), tok, dcfg(path, max_length=cap, truncation="drop"))
    assert (dropped.rows, len(dropped.samples), dropped.dropped_too_long, dropped.truncated) == (3, 2, 1, 0)
    assert [len(s.input_ids) for s in dropped.samples] == lengths[:2]

    cut = tokenize_cached(str(path), tok, dcfg(path, max_length=cap, truncation="truncate"))
    assert (cut.rows, len(cut.samples), cut.dropped_too_long, cut.truncated) == (3, 3, 0, 1)
    long = cut.samples[2]
    full = tokenize_cached(str(path), tok, dcfg(path, max_length=4096)).samples[2]
    assert len(long.input_ids) == len(long.labels) == cap
    assert long.input_ids == full.input_ids[:cap] and long.labels == full.labels[:cap]


def test_sample_whose_labels_are_all_cut_is_dropped(jsonl: Any, tok: Any) -> None:
    rows = [*chat_rows(1), {"messages": [{"role": "user", "content": "long " * 80}, {"role": "assistant", "content": "ok"}]}]
    path = jsonl(rows)
    cap = _lengths(tok, path)[0] + 2
    ts = tokenize_cached(str(path), tok, dcfg(path, max_length=cap, truncation="truncate"))
    assert (len(ts.samples), ts.dropped_no_labels, ts.truncated) == (1, 1, 1)


def test_limit_reads_only_the_first_rows(jsonl: Any, tok: Any) -> None:
    path = jsonl(chat_rows(10))
    ts = tokenize_cached(str(path), tok, dcfg(path, limit=4))
    assert ts.rows == 4 and len(ts.samples) == 4


# ------------------------------------------------------------------------------------------ cache


def test_tokenisation_cache_hit_on_second_call(jsonl: Any, tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    import tunelab.data.batching.sft as sft_batcher

    real = sft_batcher.encode

    def counting(*a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(sft_batcher, "encode", counting)
    monkeypatch.setenv("TUNELAB_DATA_CACHE", "1")  # (mutation.sh turns it off for everything else)
    path = jsonl(chat_rows(5))
    first = tokenize_cached(str(path), tok, dcfg(path))
    assert calls["n"] == 5
    second = tokenize_cached(str(path), tok, dcfg(path))
    assert calls["n"] == 5  # served from the cache
    assert [s.input_ids for s in second.samples] == [s.input_ids for s in first.samples]
    assert [s.labels for s in second.samples] == [s.labels for s in first.samples]
    # a setting that changes tokenisation misses the cache
    tokenize_cached(str(path), tok, dcfg(path, loss_on="all"))
    assert calls["n"] == 10
    # so does editing the file
    jsonl(chat_rows(6))
    assert len(tokenize_cached(str(path), tok, dcfg(path)).samples) == 6
    assert calls["n"] == 16


# ------------------------------------------------------------------------------------------ build_data


def test_build_data_split_and_stats(jsonl: Any, tok: Any) -> None:
    path = jsonl(chat_rows(20))
    bundle = build_data(dcfg(path, valid_size=0.25, max_length=256), tok, batch_size=2, seed=0)
    st = bundle.stats
    assert (st["rows"], st["train_samples"], st["valid_samples"]) == (20, 15, 5)
    assert bundle.valid is not None and not bundle.valid.shuffle
    train_ids = {tuple(s.input_ids) for s in bundle.train.samples}
    valid_ids = {tuple(s.input_ids) for s in bundle.valid.samples}
    assert not train_ids & valid_ids
    assert st["train_label_tokens"] == sum(sum(x != IGNORE for x in s.labels) for s in bundle.train.samples)


def test_split_valid_count_and_fraction(jsonl: Any, tok: Any) -> None:
    ts = tokenize_cached(str(jsonl(chat_rows(10))), tok, DataConfig(train="x"))
    assert [len(x) for x in split_valid(ts, 3, 0)] == [7, 3]
    assert [len(x) for x in split_valid(ts, 0.2, 0)] == [8, 2]
    assert [len(x) for x in split_valid(ts, 0, 0)] == [10, 0]
    assert split_valid(ts, 3, 0)[1] == split_valid(ts, 3, 0)[1]  # seeded
    assert split_valid(ts, 3, 0)[1] != split_valid(ts, 3, 1)[1]


def test_batches_order_is_seeded_per_epoch(jsonl: Any, tok: Any) -> None:
    path = jsonl(chat_rows(12))
    b = build_data(dcfg(path, valid_size=0, packing=False), tok, batch_size=2, seed=5).train
    assert len(b) == 6
    assert b.order(0) == b.order(0) and b.order(0) != b.order(1)
    seen = []
    for i in range(len(b)):
        batch = b.batch(1, i)
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            seen.append(tuple(ids[: int(mask.sum())].tolist()))
    assert sorted(seen) == sorted(tuple(s.input_ids) for s in b.samples)  # every sample once per epoch
