"""Packing: bins respect capacity, keep every sample once; packed rows give the same per-sample losses as
separate sequences (no cross-sample attention, per-sample label shift, position_ids reset)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from tunelab.data.packing import collate, pack, shifted
from tunelab.data.templating import IGNORE, Encoded
from tunelab.objectives._logprobs import label_logits

# --------------------------------------------------------------------------------------------- pack()


@pytest.mark.parametrize("seed", range(5))
def test_pack_respects_capacity_and_keeps_every_sample_once(seed: int) -> None:
    rng = random.Random(seed)
    capacity = 64
    lengths = [rng.randint(1, capacity) for _ in range(200)]
    rows = pack(lengths, capacity)
    flat = [i for row in rows for i in row]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    # first-fit decreasing is near-optimal: within 11/9 OPT + 1 of the volume bound
    lower = -(-sum(lengths) // capacity)
    assert len(rows) <= 11 / 9 * lower + 1
    assert rows == pack(lengths, capacity)  # deterministic


def test_pack_fills_rows() -> None:
    assert pack([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert pack([7, 3, 6, 4], 10) == [[0, 1], [2, 3]]
    assert pack([10, 10], 10) == [[0], [1]]


# --------------------------------------------------------------------------------------------- collate()


def test_collate_packed_layout(samples: list[Encoded]) -> None:
    a, b, c = samples[:3]
    batch = collate([[a, b], [c]], pad_id=2, packed=True)
    la, lb, lc = len(a.input_ids), len(b.input_ids), len(c.input_ids)
    width = max(la + lb, lc)
    assert batch["input_ids"].shape == (2, width) and "attention_mask" not in batch
    assert batch["input_ids"][0, :la].tolist() == a.input_ids
    assert batch["input_ids"][0, la : la + lb].tolist() == b.input_ids
    pos = batch["position_ids"][0].tolist()
    assert pos[:la] == list(range(la)) and pos[la : la + lb] == list(range(lb))
    # labels shifted within each sample: IGNORE at each sample's last position, never the neighbour's token
    assert batch["labels"][0, :la].tolist() == a.labels[1:] + [IGNORE]
    assert batch["labels"][0, la : la + lb].tolist() == b.labels[1:] + [IGNORE]
    assert batch["labels"][1, lc:].eq(IGNORE).all()
    assert int(batch["real_tokens"]) == la + lb + lc


def test_collate_unpacked_pads_right_with_mask(samples: list[Encoded]) -> None:
    a, b = samples[0], samples[2]
    batch = collate([[a], [b]], pad_id=2, packed=False)
    assert "position_ids" not in batch
    assert batch["attention_mask"].sum(1).tolist() == [len(a.input_ids), len(b.input_ids)]
    short = 0 if len(a.input_ids) < len(b.input_ids) else 1
    n = min(len(a.input_ids), len(b.input_ids))
    assert batch["input_ids"][short, n:].eq(2).all()
    assert batch["labels"][short, n - 1 :].eq(IGNORE).all()


def test_shifted() -> None:
    assert shifted([IGNORE, 5, 6]) == [5, 6, IGNORE]


# --------------------------------------------------------------------------------------------- losses


def per_sample_losses(model: Any, batch: dict[str, torch.Tensor], segments: torch.Tensor, n: int) -> torch.Tensor:
    """Summed token NLL per sample; `segments[b, t]` is the sample index owning position (b, t)."""
    logits, labels = label_logits(model, batch)
    nll = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    owner = segments[batch["labels"] != IGNORE]
    return torch.zeros(n, dtype=torch.float64).index_add_(0, owner, nll.double())


def segments_of(rows: list[list[Encoded]], width: int, first: int = 0) -> torch.Tensor:
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    k = first
    for b, row in enumerate(rows):
        t = 0
        for s in row:
            seg[b, t : t + len(s.input_ids)] = k
            t += len(s.input_ids)
            k += 1
    return seg


def separate_losses(model: Any, samples: list[Encoded]) -> torch.Tensor:
    out = []
    for s in samples:
        batch = collate([[s]], pad_id=2, packed=False)
        out.append(per_sample_losses(model, batch, segments_of([[s]], len(s.input_ids)), 1))
    return torch.cat(out)


@pytest.fixture(params=["assistant", "all"])
def rows(request: pytest.FixtureRequest, samples: list[Encoded]) -> list[list[Encoded]]:
    """Three packed rows of 3, 2 and 1 samples; labels on assistant tokens only, or on every token."""
    if request.param == "all":
        samples = [Encoded(s.input_ids, list(s.input_ids)) for s in samples]
    return [samples[:3], samples[3:5], samples[5:]]


def test_packed_per_sample_loss_equals_unpacked(model: Any, rows: list[list[Encoded]]) -> None:
    flat = [s for r in rows for s in r]
    batch = collate(rows, pad_id=2, packed=True)
    batch.pop("real_tokens")
    with torch.no_grad():
        packed = per_sample_losses(model, batch, segments_of(rows, batch["input_ids"].shape[1]), len(flat))
        alone = separate_losses(model, flat)
    assert torch.allclose(packed, alone, atol=1e-5, rtol=0), (packed - alone).abs().max()
    # and through the model's own forward (not the label_logits fast path). use_cache=False matters:
    # transformers only derives the block-diagonal mask from position_ids when there is no KV cache.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    sel = batch["labels"] != IGNORE
    nll = torch.nn.functional.cross_entropy(logits[sel], batch["labels"][sel], reduction="none")
    seg = segments_of(rows, batch["input_ids"].shape[1])[sel]
    own = torch.zeros(len(flat), dtype=torch.float64).index_add_(0, seg, nll.double())
    assert torch.allclose(own, alone, atol=1e-5, rtol=0)


def test_padded_unpacked_batch_equals_separate(model: Any, samples: list[Encoded]) -> None:
    batch = collate([[s] for s in samples], pad_id=2, packed=False)
    batch.pop("real_tokens")
    with torch.no_grad():
        got = per_sample_losses(model, batch, segments_of([[s] for s in samples], batch["input_ids"].shape[1]), len(samples))
        alone = separate_losses(model, samples)
    assert torch.allclose(got, alone, atol=1e-5, rtol=0)


def test_packing_without_position_reset_is_detected(model: Any, rows: list[list[Encoded]]) -> None:
    """The comparison above must be able to fail: one long sequence (positions 0..T, causal across samples)."""
    flat = [s for r in rows for s in r]
    batch = collate(rows, pad_id=2, packed=True)
    batch.pop("real_tokens")
    width = batch["input_ids"].shape[1]
    wrong = dict(batch, position_ids=torch.arange(width).expand_as(batch["input_ids"]).clone())
    with torch.no_grad():
        bad = per_sample_losses(model, wrong, segments_of(rows, width), len(flat))
        alone = separate_losses(model, flat)
    first_in_row = [0, 3, 5]  # a row's first sample attends to nothing before it either way
    others = [i for i in range(len(flat)) if i not in first_in_row]
    assert torch.allclose(bad[first_in_row], alone[first_in_row], atol=1e-5, rtol=0)
    assert (bad[others] - alone[others]).abs().min() > 1e-3


def test_whole_row_label_shift_is_detected(model: Any, samples: list[Encoded]) -> None:
    """Shifting labels over the whole row (not per sample) would train on the neighbour's first token."""
    rows = [[Encoded(s.input_ids, list(s.input_ids)) for s in samples[:3]]]
    batch = collate(rows, pad_id=2, packed=True)
    lens = [len(s.input_ids) for s in rows[0]]
    ends = [sum(lens[: k + 1]) - 1 for k in range(3)]
    assert all(batch["labels"][0, e] == IGNORE for e in ends)
    naive = dict(batch)
    naive["labels"] = batch["labels"].clone()
    row_ids = batch["input_ids"][0, : sum(lens)]
    naive["labels"][0, : sum(lens) - 1] = row_ids[1:]
    naive.pop("real_tokens")
    batch.pop("real_tokens")
    seg = segments_of(rows, batch["input_ids"].shape[1])
    with torch.no_grad():
        good = per_sample_losses(model, batch, seg, 3)
        bad = per_sample_losses(model, naive, seg, 3)
        alone = separate_losses(model, rows[0])
    assert torch.allclose(good, alone, atol=1e-5, rtol=0)
    assert (bad[:2] - alone[:2]).abs().min() > 1e-3  # the first two samples gain a cross-border target


def test_pack_is_first_fit_decreasing_exactly() -> None:
    # longest first (ties in input order), each into the first row with room: [9, 1] and [5, 5]. In input order
    # (no sort) first-fit would need three rows: [1, 5], [5], [9].
    assert pack([1, 5, 5, 9], capacity=10) == [[3, 0], [1, 2]]
    assert pack([4, 4, 4], capacity=8) == [[0, 1], [2]]  # ties keep their order


def test_collate_sequence_index_by_hand() -> None:
    """Two packed rows of samples whose labels are known: every labelled (shifted) position names its sequence,
    numbered across rows, -1 elsewhere; num_seqs counts them; every tensor is int64."""
    a = Encoded([1, 2, 3], [IGNORE, 2, 3])  # prompt token, then two answer tokens
    b = Encoded([4, 5], [IGNORE, 5])
    c = Encoded([6, 7, 8, 9], [IGNORE, IGNORE, 8, 9])
    batch = collate([[a, b], [c]], pad_id=0, packed=True)
    # labels shifted left within each sample: a -> [2, 3, -], b -> [5, -], c -> [-, 8, 9, -]
    assert batch["labels"].tolist() == [[2, 3, IGNORE, 5, IGNORE], [IGNORE, 8, 9, IGNORE, IGNORE]]
    assert batch["seq_index"].tolist() == [[0, 0, -1, 1, -1], [-1, 2, 2, -1, -1]]
    assert int(batch["num_seqs"]) == 3 and int(batch["real_tokens"]) == 9
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    for key in ("input_ids", "labels", "seq_index", "position_ids", "num_seqs", "real_tokens"):
        assert batch[key].dtype == torch.long, key
    unpacked = collate([[a], [c]], pad_id=0, packed=False)
    assert unpacked["attention_mask"].dtype == torch.long and unpacked["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert unpacked["seq_index"].tolist() == [[0, 0, -1, -1], [-1, 1, 1, -1]] and int(unpacked["num_seqs"]) == 2
