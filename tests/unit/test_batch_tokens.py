"""Micro-batches sized by tokens (train.batch_tokens): the budget holds, every row trains once per epoch, the
order is seeded per epoch (so a data position resumes), padding drops against row-count batches, and the loop
trains with it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import chat_rows

from tunelab.config import DataConfig
from tunelab.data import build_data, token_groups

PAIR = {"prompt": "Write add(a, b).", "chosen": "def add(a, b):\n    return a + b",
        "rejected": "def add(a, b):\n    return a - b  # and a much longer wrong answer to vary the width"}


def test_groups_respect_the_budget_and_cover_every_index() -> None:
    shapes = [(1, w) for w in (50, 10, 40, 10, 30, 200, 20)] + [(2, 25)]  # the last: a pair, two tensor rows
    groups = token_groups(shapes, budget=80)
    assert sorted(i for g in groups for i in g) == list(range(len(shapes)))
    for g in groups:
        rows, width = sum(shapes[i][0] for i in g), max(shapes[i][1] for i in g)
        assert rows * width <= 80 or len(g) == 1  # a single over-wide row trains alone
    assert [5] in groups  # the 200-token row


@pytest.mark.parametrize("packing", [False, True])
def test_batches_by_tokens(jsonl: Any, tok: Any, packing: bool) -> None:
    cfg = DataConfig(train=str(jsonl(chat_rows(40))), max_length=256, packing=packing, valid_size=0)
    data = build_data(cfg, tok, batch_size=4, seed=0, batch_tokens=300).train
    by_rows = build_data(cfg, tok, batch_size=4, seed=0).train
    seen: list[int] = []
    fed = padded_rows = 0
    order = data.order(0)
    for i in range(len(data)):
        b = data.batch(0, i, order)
        assert b["input_ids"].numel() <= 300 or b["input_ids"].shape[0] == 1
        seen += b["sample_ids"].tolist()
        fed += b["input_ids"].numel()
    assert sorted(seen) == sorted(u.sid for u in data.samples)  # each sample once per epoch
    assert data.order(1) != data.order(0) and data.order(1) == data.order(1)  # seeded per epoch: resumable
    if not packing:  # similar lengths together: less padding than row-count batches in shuffled order
        padded_rows = sum(by_rows.batch(0, i, by_rows.order(0))["input_ids"].numel() for i in range(len(by_rows)))
        assert fed < padded_rows
    assert data.batch(0, 1, order)["input_ids"].equal(data.batch(0, 1)["input_ids"])


def test_pairs_count_both_sequences(jsonl: Any, tok: Any) -> None:
    cfg = DataConfig(train=str(jsonl([PAIR] * 6)), max_length=128, packing=False, valid_size=0)
    data = build_data(cfg, tok, batch_size=8, seed=0, batch_format="pairwise", batch_tokens=2 * 60).train
    shapes = [data.row_shape(r) for r in data.rows]
    assert all(rows == 2 for rows, _ in shapes)
    for i in range(len(data)):
        assert data.batch(0, i)["input_ids"].numel() <= 120 or len(data.groups[i]) == 1  # type: ignore[index]


def test_the_loop_trains_with_batch_tokens(jsonl: Any, tmp_path: Any) -> None:
    from tunelab.config import load_config
    from tunelab.train.loop import train

    cfg = load_config(None, ["model.name=tiny-llama", f"data.train={jsonl(chat_rows(20))}", "data.max_length=128",
                             "data.packing=false", "train.batch_tokens=256", "train.max_steps=3", "train.save_every=0",
                             "eval.before=false", "eval.after=false", "train.tensorboard=false", f"out={tmp_path / 'run'}"])
    result = train(cfg, quiet=True)
    assert result.summary["steps"] == 3 and result.summary["data"]["train_micro_batches"] > 1
    assert torch.isfinite(torch.tensor(result.summary["val_loss_after"]))
