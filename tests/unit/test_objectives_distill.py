"""FIRST top-k distillation: `first_kl` on hand-computed examples (linear/softmax norms, with and without the
"other" bucket), KL = 0 at the teacher, gradient sign, and the objective on the tiny model: the teacher table
built and cached by `prepare` (no teacher reload on a second prepare, a killed pass resumes), ~0 loss against
identical weights, > 0 against perturbed ones, padded == packed, exact accumulation, clear errors."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import chat_rows, write_jsonl
from pydantic import ValidationError

import tunelab.models as models
from tunelab.config import DataConfig
from tunelab.data import tokenize_cached
from tunelab.data.batching import Unit, get_batcher
from tunelab.errors import UserError
from tunelab.objectives import OBJECTIVES
from tunelab.objectives import distill as D
from tunelab.objectives._base import PrepareContext
from tunelab.objectives._logprobs import label_logits
from tunelab.objectives.distill import DistillConfig, first_kl
from tunelab.objectives.sft import sft_loss

R = math.sqrt


def kl(t: list[float], s: list[float]) -> float:
    """KL(t || s) of two hand-written bucket distributions."""
    return sum(a * math.log(a / b) for a, b in zip(t, s, strict=True))


# vocab 5, two positions. Student probs; teacher top-2 ids and probs (teacher mass outside: 0.1 and 0.2).
STUDENT = [[0.5, 0.2, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.3, 0.3]]
T_IDS = [[0, 1], [3, 2]]
T_P = [[0.6, 0.3], [0.4, 0.4]]
# student at the teacher ids: row 0 (.5, .2), other .3; row 1 (.3, .2), other .5
HAND = {
    # linear + other: buckets are already distributions (eps 1e-6 aside)
    ("linear", 1.0, 1.0, True): [kl([.6, .3, .1], [.5, .2, .3]), kl([.4, .4, .2], [.3, .2, .5])],
    # linear, no other: renormalise the two top-k probs
    ("linear", 1.0, 1.0, False): [kl([2 / 3, 1 / 3], [5 / 7, 2 / 7]), kl([.5, .5], [.6, .4])],
    # softmax(log q / 2) = sqrt(q) / sum sqrt(q) for the teacher; T_s = 1 leaves the student renormalised
    ("softmax", 2.0, 1.0, False): [
        kl([R(.6) / (R(.6) + R(.3)), R(.3) / (R(.6) + R(.3))], [5 / 7, 2 / 7]), kl([.5, .5], [.6, .4])],
    ("softmax", 2.0, 1.0, True): [
        kl([x / (R(.6) + R(.3) + R(.1)) for x in (R(.6), R(.3), R(.1))], [.5, .2, .3]),
        kl([x / (2 * R(.4) + R(.2)) for x in (R(.4), R(.4), R(.2))], [.3, .2, .5])],
    # student temperature 0.5: softmax(2 log q) = q^2 / sum q^2
    ("softmax", 1.0, 0.5, False): [kl([2 / 3, 1 / 3], [25 / 29, 4 / 29]), kl([.5, .5], [36 / 52, 16 / 52])],
}


@pytest.mark.parametrize("case", list(HAND), ids=lambda c: f"{c[0]}-Tt{c[1]}-Ts{c[2]}-other{c[3]}")
def test_first_kl_hand_computed(case: tuple[str, float, float, bool]) -> None:
    norm, tt, ts, other = case
    out = first_kl(torch.tensor(STUDENT).log(), torch.tensor(T_IDS, dtype=torch.int32), torch.tensor(T_P).log(),
                   norm=norm, teacher_temperature=tt, student_temperature=ts, other_token=other)
    assert out.shape == (2,)
    assert out.tolist() == pytest.approx(HAND[case], rel=1e-4, abs=1e-5)  # linear's eps moves it by ~1e-6


SETTINGS = [("linear", 1.0, True), ("linear", 1.0, False), ("softmax", 1.0, True), ("softmax", 0.7, False), ("softmax", 2.0, True)]


@pytest.mark.parametrize(("norm", "temp", "other"), SETTINGS)
def test_zero_when_student_is_teacher(norm: str, temp: float, other: bool) -> None:
    lp = torch.log_softmax(torch.randn(4, 11, generator=torch.Generator().manual_seed(0)) * 2, -1)
    top = lp.topk(3, -1)
    out = first_kl(lp, top.indices, top.values, norm=norm, teacher_temperature=temp, student_temperature=temp, other_token=other)
    assert out.abs().max().item() < 1e-6


@pytest.mark.parametrize(("norm", "temp", "other"), SETTINGS)
def test_gradient_moves_student_towards_teacher_top_token(norm: str, temp: float, other: bool) -> None:
    logits = torch.zeros(1, 5, requires_grad=True)  # uniform student: 0.2 each
    ids, lp = torch.tensor([[2, 0]]), torch.tensor([[0.7, 0.1]]).log()
    out = first_kl(torch.log_softmax(logits, -1), ids, lp, norm=norm, teacher_temperature=temp,
                   student_temperature=temp, other_token=other)
    assert out.item() > 0
    out.sum().backward()
    assert logits.grad[0, 2] < 0  # descent raises the logit of the teacher's top token
    assert logits.grad[0, 2] == logits.grad.min()
    with torch.no_grad():
        stepped = torch.softmax(logits - 0.5 * logits.grad, -1)
    assert stepped[0, 2] > 0.2


@pytest.mark.parametrize("norm", ["linear", "softmax"])
def test_teacher_topk_mass_rounding_above_one_stays_finite(norm: str) -> None:
    lp = torch.log_softmax(torch.tensor([[3.0, 1.0, -2.0, -2.0]]), -1)
    t_lp = torch.tensor([[math.log(0.7), math.log(0.3000002)]])  # sums past 1: empty other bucket
    out = first_kl(lp, torch.tensor([[0, 1]]), t_lp, norm=norm, teacher_temperature=1.0, student_temperature=1.0, other_token=True)
    assert torch.isfinite(out).all() and out.item() > 0


def test_config_defaults_and_validation() -> None:
    cfg = DistillConfig()
    assert (cfg.teacher, cfg.top_k, cfg.norm, cfg.teacher_temperature, cfg.student_temperature, cfg.other_token, cfg.ce_weight) == (
        None, 5, "linear", 1.0, 1.0, True, 0.0)
    with pytest.raises(ValidationError, match="norm=softmax"):
        DistillConfig(teacher="tiny-llama", teacher_temperature=2.0)
    DistillConfig(teacher="tiny-llama", norm="softmax", teacher_temperature=2.0)


# ------------------------------------------------------------------------------ objective on the tiny model


@pytest.fixture(scope="module")
def units(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> list[Unit]:
    path = write_jsonl(tmp_path_factory.mktemp("distill") / "sft.jsonl", chat_rows(5))
    return tokenize_cached(str(path), tok, DataConfig(train=str(path), max_length=256), "train", "sft").samples


def ctx_for(units: list[Unit], tok: Any, cache: Path) -> PrepareContext:
    return PrepareContext(units, get_batcher("sft"), tok.pad_token_id, "cpu", contextlib.nullcontext, 2, cache, quiet=True)


def obj(**kw: Any) -> Any:
    return OBJECTIVES.get("distill")(DistillConfig(teacher="tiny-llama", **kw))


def batch_of(units: list[Unit], tok: Any, packed: bool) -> dict[str, torch.Tensor]:
    rows = [units[:2], units[2:]] if packed else [[u] for u in units]
    batch = get_batcher("sft").collate(rows, tok.pad_token_id, packed)
    batch.pop("real_tokens")
    return batch


def perturbed(make_model: Any) -> torch.nn.Module:
    model = make_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = models.load_model

    def load(cfg: Any, device: Any = "cpu") -> Any:
        calls.append(cfg.name)
        assert cfg.dtype == "float32"
        return real(cfg, device)

    monkeypatch.setattr(models, "load_model", load)
    return calls


def test_table_layout(units: list[Unit], tok: Any, tmp_path: Path, make_model: Any) -> None:
    o = obj()
    o.prepare(ctx_for(units, tok, tmp_path))
    assert set(o.table) == {u.sid for u in units} and o.vocab_size == len(tok)
    for u in units:
        ids, lps = o.table[u.sid]
        n = sum(x != -100 for x in u.labels)
        assert ids.shape == lps.shape == (n, 5) and ids.dtype == torch.int32 and lps.dtype == torch.float32
    # the rows are the teacher's top-5 at the unit's labelled positions, in position order
    u = units[3]
    with torch.no_grad():
        logits, _ = label_logits(make_model(), get_batcher("sft").collate([[u]], tok.pad_token_id, False))
    top = torch.log_softmax(logits, -1).topk(5, -1)
    assert torch.equal(o.table[u.sid][0].long(), top.indices)
    assert torch.allclose(o.table[u.sid][1], top.values, atol=1e-5)


def test_same_weights_zero_perturbed_positive(units: list[Unit], tok: Any, tmp_path: Path, make_model: Any) -> None:
    o = obj()
    o.prepare(ctx_for(units, tok, tmp_path))
    batch = batch_of(units, tok, packed=False)
    n = o.num_items(batch)
    with torch.no_grad():
        same, m = o.loss(make_model(), batch, n)
        other, m2 = o.loss(perturbed(make_model), batch, n)
    assert set(m) >= {"kl", "teacher_topk_mass"} and all(isinstance(v, float) for v in m.values())
    # the tiny random model is nearly uniform (top-5 mass ~2e-4), so the "other" bucket dominates and KLs are small
    assert abs(same.item()) < 1e-7 and abs(m["kl"]) < 1e-7  # identical weights: 0 up to fp32 and the 1e-6 eps
    assert other.item() > 1e-5 and other.item() > 1000 * abs(same.item())
    assert m2["kl"] == pytest.approx(other.item())  # num_items = this batch's label tokens
    assert 0 < m["teacher_topk_mass"] <= 1 + 1e-5 and m2["teacher_topk_mass"] == m["teacher_topk_mass"]


def test_ce_weight_adds_sft(units: list[Unit], tok: Any, tmp_path: Path, make_model: Any) -> None:
    o = obj(ce_weight=0.5)
    o.prepare(ctx_for(units, tok, tmp_path))
    model, batch = make_model(), batch_of(units, tok, packed=False)
    n = o.num_items(batch)
    with torch.no_grad():
        loss, _ = o.loss(model, batch, n)
        logits, labels = label_logits(model, batch)
        assert loss.item() == pytest.approx(0.5 * sft_loss(logits, labels, n).item(), rel=1e-5)


def test_prepare_cache_reused_no_teacher_load(units: list[Unit], tok: Any, tmp_path: Path, counting: list[str]) -> None:
    a = obj()
    a.prepare(ctx_for(units, tok, tmp_path))
    assert counting == ["tiny-llama"]
    assert len(list((tmp_path / "distill").glob("*/part-*.pt"))) == 1
    b = obj()
    b.prepare(ctx_for(units, tok, tmp_path))
    assert counting == ["tiny-llama"]  # second prepare: cache hit, no teacher
    assert b.vocab_size == a.vocab_size
    assert all(torch.equal(a.table[s][0], b.table[s][0]) and torch.equal(a.table[s][1], b.table[s][1]) for s in a.table)
    obj(top_k=3).prepare(ctx_for(units, tok, tmp_path))  # another k is another table
    assert counting == ["tiny-llama", "tiny-llama"]


def test_killed_pass_resumes(units: list[Unit], tok: Any, tmp_path: Path, counting: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "SHARD", 2)
    a = obj()
    a.prepare(ctx_for(units, tok, tmp_path))
    parts = sorted((tmp_path / "distill").glob("*/part-*.pt"))
    assert len(parts) == 3
    kept = parts[0].stat().st_mtime_ns
    parts[1].unlink()  # as if killed while writing the second shard
    b = obj()
    b.prepare(ctx_for(units, tok, tmp_path))
    assert counting == ["tiny-llama", "tiny-llama"] and parts[1].is_file() and parts[0].stat().st_mtime_ns == kept
    assert all(torch.equal(a.table[s][1], b.table[s][1]) for s in a.table)


def test_padded_equals_packed_and_accumulation(units: list[Unit], tok: Any, tmp_path: Path, make_model: Any) -> None:
    o = obj()
    o.prepare(ctx_for(units, tok, tmp_path))
    model = perturbed(make_model)
    with torch.no_grad():
        a, _ = o.loss(model, batch_of(units, tok, False), 7)
        b, _ = o.loss(model, batch_of(units, tok, True), 7)
        big = batch_of(units, tok, False)
        n = o.num_items(big)
        whole, _ = o.loss(model, big, n)
        parts = [o.loss(model, batch_of(us, tok, False), n)[0].item() for us in (units[:2], units[2:])]
    assert a.item() == pytest.approx(b.item(), rel=1e-4, abs=1e-9)
    assert sum(parts) == pytest.approx(whole.item(), rel=1e-5)
    loss, _ = o.loss(model.train(), big, n)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_errors(units: list[Unit], tok: Any, tmp_path: Path, make_model: Any) -> None:
    batch = batch_of(units[:2], tok, False)
    unset = OBJECTIVES.get("distill")(DistillConfig())
    with pytest.raises(UserError, match="objective.teacher is not set and there is no base model"):
        unset.prepare(ctx_for(units, tok, tmp_path))  # no teacher and no base model to self-distil from
    with pytest.raises(RuntimeError, match="prepare"):
        obj().loss(make_model(), batch, 10)
    o = obj()
    o.prepare(ctx_for(units[2:], tok, tmp_path))
    with pytest.raises(RuntimeError, match="sample id"):
        o.loss(make_model(), batch, 10)
    o.vocab_size = 1234
    with pytest.raises(UserError, match="vocabulary"):
        o.loss(make_model(), batch_of(units[2:], tok, False), 10)


def test_self_distillation_from_the_base_model(units: list[Unit], tok: Any, tmp_path: Path, make_model: Any) -> None:
    """No teacher: the base model is its own teacher (its top-k); at init the loss is ~0, and its mode is kept."""
    import dataclasses

    base = make_model().train()
    o = OBJECTIVES.get("distill")(DistillConfig())
    o.prepare(dataclasses.replace(ctx_for(units, tok, tmp_path), model=base))
    assert base.training and all(p.requires_grad for p in base.parameters())
    loss, _ = o.loss(make_model(), batch_of(units[:3], tok, False), 10)
    assert loss.item() < 1e-6
