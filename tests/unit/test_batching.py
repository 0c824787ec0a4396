"""The batchers: every data shape an objective can declare, encoded from rows and collated.

Checked by decoding what carries loss (only the completions), by the sequence numbering the objectives rely
on (chosen/rejected interleaved; padded and packed layouts number alike), and by the one-line errors that
name file and line for malformed rows.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.config import DataConfig
from tunelab.data import build_data, tokenize_cached
from tunelab.data.batching import get_batcher
from tunelab.data.templating import IGNORE
from tunelab.errors import UserError
from tunelab.objectives._logprobs import sequence_logps

P = "Write add(a, b)."
GOOD = "def add(a, b):\n    return a + b"
BAD = "def add(a, b):\n    return a - b"


def units(jsonl: Any, tok: Any, rows: list[Any], fmt: str, **cfg: Any) -> Any:
    path = jsonl(rows)
    return tokenize_cached(str(path), tok, DataConfig(train=str(path), **({"max_length": 256} | cfg)), "train", fmt)


def learned(tok: Any, seq: Any) -> str:
    return tok.decode([t for t in seq.labels if t != IGNORE])


def test_pairwise_string_form_learns_only_the_completions(jsonl: Any, tok: Any) -> None:
    ts = units(jsonl, tok, [{"prompt": P, "chosen": GOOD, "rejected": BAD}], "pairwise")
    (u,) = ts.samples
    assert [learned(tok, s) for s in u.seqs] == [GOOD + "<|im_end|>", BAD + "<|im_end|>"]
    # the prompt is the same token prefix in both sequences
    first = [s.labels.index(next(t for t in s.labels if t != IGNORE)) for s in u.seqs]
    assert first[0] == first[1] and u.seqs[0].input_ids[: first[0]] == u.seqs[1].input_ids[: first[1]]
    assert P in tok.decode(u.seqs[0].input_ids[: first[0]])


def test_pairwise_message_and_full_conversation_forms_agree(jsonl: Any, tok: Any) -> None:
    user = [{"role": "user", "content": P}]
    rows = [
        {"prompt": P, "chosen": GOOD, "rejected": BAD},
        {"prompt": user, "chosen": [{"role": "assistant", "content": GOOD}], "rejected": BAD},
        {"chosen": [*user, {"role": "assistant", "content": GOOD}], "rejected": [*user, {"role": "assistant", "content": BAD}]},
    ]
    ts = units(jsonl, tok, rows, "pairwise")
    assert len(ts.samples) == 3
    enc = [[(s.input_ids, s.labels) for s in u.seqs] for u in ts.samples]
    assert enc[0] == enc[1] == enc[2]


def test_identical_pairs_are_dropped_and_counted(jsonl: Any, tok: Any) -> None:
    ts = units(jsonl, tok, [{"prompt": P, "chosen": GOOD, "rejected": BAD}, {"prompt": P, "chosen": GOOD, "rejected": GOOD}], "pairwise")
    assert len(ts.samples) == 1 and ts.dropped_other == {"identical_pair": 1}


@pytest.mark.parametrize(
    ("fmt", "row", "needle"),
    [
        ("pairwise", {"prompt": P, "chosen": GOOD}, "missing field 'rejected'"),
        ("pairwise", {"prompt": P, "chosen": "  ", "rejected": BAD}, "field 'chosen' is empty"),
        ("pairwise", {"prompt": P, "chosen": [{"role": "robot", "content": "x"}], "rejected": BAD}, "chosen[0]"),
        ("pairwise", {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                      "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}, "share"),
        ("ranked", {"prompt": P, "responses": [GOOD, BAD], "scores": [1.0]}, "one number per response"),
        ("ranked", {"prompt": P, "responses": [GOOD], "scores": [1.0]}, "at least 2"),
        ("ranked", {"prompt": P, "responses": [GOOD, BAD], "scores": [1.0, "high"]}, "must all be numbers"),
        ("unpaired", {"prompt": P, "completion": GOOD, "label": "maybe"}, "'label' must be true"),
        ("unpaired", {"prompt": P, "completion": GOOD}, "missing field 'label'"),
    ],
)
def test_malformed_rows_name_file_and_line(jsonl: Any, tok: Any, fmt: str, row: dict[str, Any], needle: str) -> None:
    good = {"pairwise": {"prompt": P, "chosen": GOOD, "rejected": BAD},
            "ranked": {"prompt": P, "responses": [GOOD, BAD], "scores": [1, 0]},
            "unpaired": {"prompt": P, "completion": GOOD, "label": True}}[fmt]
    with pytest.raises(UserError) as e:
        units(jsonl, tok, [good, good, row], fmt)
    msg = str(e.value)
    assert "train.jsonl:3:" in msg and needle in msg and "\n" not in msg


def test_prompt_longer_than_max_length_is_an_error(jsonl: Any, tok: Any) -> None:
    with pytest.raises(UserError, match=r"train.jsonl:1: the prompt alone is \d+ tokens, leaving no room under data.max_length=16"):
        units(jsonl, tok, [{"prompt": P * 10, "chosen": GOOD, "rejected": BAD}], "pairwise", max_length=16)


def test_ranked_scores_and_owners(jsonl: Any, tok: Any) -> None:
    rows = [{"prompt": P, "responses": [BAD, GOOD, "pass"], "scores": [0, 1, -1]}, {"prompt": P, "responses": [GOOD, BAD], "scores": [2, 1]}]
    ts = units(jsonl, tok, rows, "ranked")
    batch = get_batcher("ranked").collate([[u] for u in ts.samples], tok.pad_token_id, packed=False)
    assert batch["scores"].tolist() == [0.0, 1.0, -1.0, 2.0, 1.0]
    assert batch["seq_unit"].tolist() == [0, 0, 0, 1, 1] and int(batch["num_seqs"]) == 5


def test_unpaired_labels_and_mismatched_kl_sequences(jsonl: Any, tok: Any) -> None:
    rows = [{"prompt": f"task {i}", "completion": f"answer {i}", "label": lab} for i, lab in enumerate([True, "false", 1, "no"])]
    ts = units(jsonl, tok, rows, "unpaired")
    assert [u.meta for u in ts.samples] == [{"desirable": d} for d in (True, False, True, False)]
    for i, u in enumerate(ts.samples):  # the KL sequence pairs prompt i with the next sample's completion
        assert learned(tok, u.seqs[0]).startswith(f"answer {i}")
        assert learned(tok, u.seqs[1]).startswith(f"answer {(i + 1) % 4}")
        assert f"task {i}" in tok.decode(u.seqs[1].input_ids)
    batch = get_batcher("unpaired").collate([ts.samples], tok.pad_token_id, packed=True)
    assert batch["desirable"].tolist() == [True, False, True, False] and int(batch["num_seqs"]) == 8


def test_prompt_only_left_pads(jsonl: Any, tok: Any) -> None:
    ts = units(jsonl, tok, [{"prompt": "hi"}, {"prompt": P * 3}], "prompt_only")
    batch = get_batcher("prompt_only").collate([[u] for u in ts.samples], tok.pad_token_id, packed=False)
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
    assert tok.decode(batch["input_ids"][0][mask[0].bool()]).rstrip().endswith("assistant")


def test_packed_and_padded_layouts_give_the_same_sequence_logps(jsonl: Any, tok: Any, make_model: Any) -> None:
    rows = [{"prompt": f"{P} #{i}", "chosen": GOOD + " " * i, "rejected": BAD} for i in range(5)]
    path = jsonl(rows)
    model = make_model()
    got = {}
    for packed in (False, True):
        data = build_data(DataConfig(train=str(path), valid_size=0, packing=packed, max_length=128), tok, 5, 0, "pairwise")
        data.train.shuffle = False
        batch = data.train.batch(0, 0)
        assert batch["sample_ids"].tolist() == sorted(batch["sample_ids"].tolist()) or packed
        with torch.no_grad():
            lp = sequence_logps(model, batch)
        order = batch["sample_ids"].tolist()
        got[packed] = {sid: (lp.sum[2 * k : 2 * k + 2].tolist(), lp.count[2 * k : 2 * k + 2].tolist()) for k, sid in enumerate(order)}
    assert got[False].keys() == got[True].keys() == set(range(5))
    for sid in got[False]:
        assert got[False][sid][1] == got[True][sid][1]
        assert got[False][sid][0] == pytest.approx(got[True][sid][0], abs=1e-4)


def test_pair_rows_hold_whole_pairs(jsonl: Any, tok: Any) -> None:
    """Packed rows take a pair whole (capacity 2 x max_length), so chosen and rejected share a micro-batch."""
    rows = [{"prompt": P, "chosen": GOOD * (1 + i % 3), "rejected": BAD} for i in range(7)]
    path = jsonl(rows)
    data = build_data(DataConfig(train=str(path), valid_size=0, packing=True, max_length=64), tok, 1, 0, "pairwise")
    seen = []
    for i in range(len(data.train)):
        b = data.train.batch(0, i)
        assert int(b["num_seqs"]) == 2 * b["sample_ids"].numel() and b["input_ids"].shape[1] <= 128
        seen += b["sample_ids"].tolist()
    assert sorted(seen) == [u.sid for u in data.train.samples] and len(seen) + data.stats["dropped_too_long"] == 7


def test_fingerprint_covers_every_data_field_and_the_format(jsonl: Any, tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.data import _fingerprint

    path = str(jsonl([{"prompt": P, "chosen": GOOD, "rejected": BAD}]))
    base = DataConfig(train=path)
    keys = {_fingerprint(path, tok, base, "train", "sft"), _fingerprint(path, tok, base, "train", "pairwise")}
    for field, value in {"valid_size": 0.5, "packing": False}.items():  # fields the old hand-kept key list missed
        keys.add(_fingerprint(path, tok, base.model_copy(update={field: value}), "train", "sft"))
    assert len(keys) == 4


def test_cache_key_follows_the_encoder_code_and_the_cache_can_be_off(jsonl: Any, tok: Any, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import tunelab.data as data_mod

    path = str(jsonl([{"prompt": P, "chosen": GOOD, "rejected": BAD}]))
    cfg = DataConfig(train=path)
    key = data_mod._fingerprint(path, tok, cfg, "train", "pairwise")
    from tokenizers.processors import TemplateProcessing

    bos_tok = copy.deepcopy(tok)  # the same vocabulary and template, but a BOS token added in front
    bos_tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    assert data_mod._fingerprint(path, bos_tok, cfg, "train", "pairwise") != key
    monkeypatch.setattr(data_mod, "_encoding_code", lambda: b"another encoder")  # an upgraded or edited tunelab
    assert data_mod._fingerprint(path, tok, cfg, "train", "pairwise") != key
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TUNELAB_DATA_CACHE", "0")
    assert len(data_mod.tokenize_cached(path, tok, cfg, "train", "pairwise").samples) == 1
    assert not (tmp_path / "cache").exists()  # nothing read or written
    monkeypatch.setenv("TUNELAB_DATA_CACHE", "1")
    data_mod.tokenize_cached(path, tok, cfg, "train", "pairwise")
    assert len(list((tmp_path / "cache" / "data").glob("*.pt"))) == 1


def test_unknown_format_is_not_silently_sft(tmp_path: Path, tok: Any) -> None:
    with pytest.raises(NotImplementedError, match="no batcher for batch format 'listwise'"):
        get_batcher("listwise")


def test_multi_target_rows(jsonl: Any, tok: Any) -> None:
    ts = units(jsonl, tok, [{"prompt": P, "targets": [GOOD, "It adds."]}, {"prompt": P, "targets": [BAD, "It subtracts."]}], "multi_target")
    assert [[learned(tok, s) for s in u.seqs] for u in ts.samples] == [[GOOD + "<|im_end|>", "It adds.<|im_end|>"],
                                                                       [BAD + "<|im_end|>", "It subtracts.<|im_end|>"]]
    batch = get_batcher("multi_target").collate([ts.samples], tok.pad_token_id, packed=True)
    assert batch["target_index"].tolist() == [0, 1, 0, 1]
    with pytest.raises(UserError, match=r"train.jsonl:2: 3 targets, but earlier rows have 2"):
        units(jsonl, tok, [{"prompt": P, "targets": [GOOD, "a"]}, {"prompt": P, "targets": [GOOD, "a", "b"]}], "multi_target")
