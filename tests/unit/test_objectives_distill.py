"""FIRST top-k distillation: `first_kl` on hand-computed examples (linear/softmax norms, with and without the
"other" bucket), KL = 0 at the teacher, gradient sign, and the objective on the tiny model: the teacher table
built and cached by `prepare` (no teacher reload on a second prepare, a killed pass resumes), ~0 loss against
identical weights, > 0 against perturbed ones, padded == packed, exact accumulation, exact errors; the loss
and its metrics against an independent float64 reference (linear epsilon, temperatures, the other bucket);
what the cache holds and what keys it (teacher files, precision), a tampered shard refused, a quiet pass
silent, the vocabulary taken from the teacher's head."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pickle
import re
import shutil
import typing
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
from tunelab.data.templating import Encoded
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


@pytest.fixture(scope="module")
def one_label(units: list[Unit]) -> Unit:
    """A short unit with a single labelled token (sid 5)."""
    ids = units[0].seqs[0].input_ids[:10]
    return Unit([Encoded(ids, [-100] * 9 + [ids[9]])], sid=5)


SHARP = "sharp-teacher"


def scaled(make_model: Any, factor: float) -> torch.nn.Module:
    """The tiny model with its logits scaled by `factor` (through the final norm's weight)."""
    model = make_model()
    with torch.no_grad():
        model.model.norm.weight.mul_(factor)
    return model


def sharp(**kw: Any) -> Any:
    return OBJECTIVES.get("distill")(DistillConfig(teacher=SHARP, **kw))


@pytest.fixture(scope="module")
def shared_cache(units: list[Unit], one_label: Unit, tok: Any, make_model: Any,
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The table of the five units and `one_label`, built once for this module by a sharper teacher (the tiny
    model's logits x 10: top-5 mass ~0.4, so the top-k and the other bucket both weigh)."""
    cache = tmp_path_factory.mktemp("distill-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_model", lambda cfg, device="cpu": (scaled(make_model, 10.0), None))
        sharp().prepare(ctx_for([*units, one_label], tok, cache))
    return cache


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


def whole(message: str) -> str:
    """A pattern matching exactly `message` (pytest.raises' match searches)."""
    return f"^{re.escape(message)}$"


def test_errors(units: list[Unit], one_label: Unit, tok: Any, tmp_path: Path, shared_cache: Path, make_model: Any) -> None:
    model = make_model()
    unset = OBJECTIVES.get("distill")(DistillConfig())
    with pytest.raises(UserError, match=whole(
            "objective.teacher is not set and there is no base model to self-distil from: name the teacher model")):
        unset.prepare(ctx_for(units, tok, tmp_path))  # no teacher and no base model to self-distil from
    dup = [Unit(u.seqs, sid=7) for u in units[:2]]
    with pytest.raises(RuntimeError, match=whole(
            "distill: sample ids of the prepared units are not unique (the teacher table is keyed by them)")):
        obj().prepare(ctx_for(dup, tok, tmp_path))
    batch = batch_of(units[:2], tok, False)
    with pytest.raises(RuntimeError, match=whole(
            "distill: prepare() must run before loss() (it builds the teacher's top-k table)")):
        obj().loss(model, batch, 10)
    o = sharp()
    o.prepare(ctx_for([*units, one_label], tok, shared_cache))
    with pytest.raises(RuntimeError, match=whole("distill: sample id 9 has no teacher table row: prepare() saw other data")):
        o.loss(model, batch_of([units[0], Unit(units[1].seqs, sid=9)], tok, False), 10)
    n = int((batch["labels"] != -100).sum())
    o.vocab_size = 1234
    with pytest.raises(UserError, match=whole(
            f"the teacher ({SHARP}) has a vocabulary of 1234 tokens but the student's has {len(tok)}: "
            "distillation needs the same tokenizer for teacher and student")):
        o.loss(model, batch, 10)
    o.vocab_size = len(tok)
    ids, lps = o.table[1]
    o.table[1] = (ids[:-1], lps[:-1])  # a table built from other labels for this sample id
    with pytest.raises(RuntimeError, match=whole(f"distill: {n - 1} teacher rows for {n} labelled positions (stale table?)")):
        o.loss(model, batch, 10)


def test_self_distillation_from_the_base_model(units: list[Unit], tok: Any, tmp_path: Path, make_model: Any) -> None:
    """No teacher: the base model is its own teacher (its top-k); at init the loss is ~0, and its mode is kept."""
    base = make_model().train()
    o = OBJECTIVES.get("distill")(DistillConfig())
    o.prepare(dataclasses.replace(ctx_for(units, tok, tmp_path), model=base))
    assert base.training and all(p.requires_grad for p in base.parameters())
    loss, _ = o.loss(make_model(), batch_of(units[:3], tok, False), 10)
    assert loss.item() < 1e-6


# ------------------------------------------------------------------ against an independent float64 reference


def reference_kl(student_lp: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor, norm: str,
                 tt: float, ts: float, other: bool) -> torch.Tensor:
    """The module docstring's formula, written out in float64 probabilities: buckets q (teacher: its stored
    probs; student: its probs at the teacher ids), other = 1 - sum, then (q + 1e-6) / sum or q^(1/T) / sum."""
    tq = teacher_lp.double().exp()
    sq = student_lp.double().exp().gather(1, ids.long())
    if other:
        tq = torch.cat([tq, (1 - tq.sum(1, keepdim=True)).clamp(min=0)], 1)
        sq = torch.cat([sq, 1 - sq.sum(1, keepdim=True)], 1)

    def shape(q: torch.Tensor, temp: float) -> torch.Tensor:
        q = q + 1e-6 if norm == "linear" else q ** (1 / temp)
        return q / q.sum(1, keepdim=True)

    t, s = shape(tq, tt), shape(sq, ts)
    return torch.where(t > 0, t * (t.log() - s.log()), torch.zeros_like(t)).sum(1)


# vocab 4, top-2 at ids (0, 1). Row 0: the student gives the teacher's second token no mass at all (only the
# linear norm's 1e-6 keeps the KL finite). Row 1: a certain teacher (p = 1, then e^-120 = 0 in fp32): its
# other bucket is empty, so under linear the teacher's 1e-6 buckets alone move the KL, by ~3e-5.
EPS_STUDENT = [[0.5, 0.0, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]
EPS_T_LP = [[math.log(0.5), math.log(0.25)], [0.0, -120.0]]


@pytest.mark.parametrize("other", [True, False])
def test_first_kl_linear_epsilon_on_both_sides(other: bool) -> None:
    out = first_kl(torch.tensor(EPS_STUDENT).log(), torch.tensor([[0, 1], [0, 1]]), torch.tensor(EPS_T_LP),
                   norm="linear", teacher_temperature=1.0, student_temperature=1.0, other_token=other)
    ref = reference_kl(torch.tensor(EPS_STUDENT, dtype=torch.float64).log(), torch.tensor([[0, 1], [0, 1]]),
                       torch.tensor(EPS_T_LP), "linear", 1.0, 1.0, other)
    assert torch.isfinite(out).all()
    assert out.tolist() == pytest.approx(ref.tolist(), rel=1e-6, abs=1e-6)
    if other:  # by hand, row 0: teacher (.5, .25, .25), student (.5, 0, .5), each + 1e-6 and renormalised
        e = 1e-6
        t, s = [(x + e) / (1 + 3 * e) for x in (.5, .25, .25)], [(x + e) / (1 + 3 * e) for x in (.5, 0, .5)]
        assert out[0].item() == pytest.approx(kl(t, s), rel=1e-6)


# ------------------------------------------------------------------------ the objective against the reference


@pytest.fixture(scope="module")
def contrary(make_model: Any) -> torch.nn.Module:
    """A student contrary to the sharp teacher (logits x -3): its log-probs at the teacher's top-5 lie around
    log(1e-6) (-12.6 .. -14.8), so the linear norm's epsilon and the temperatures weigh in the KL."""
    return scaled(make_model, -3.0)


CONFIGS = [{}, {"other_token": False}, {"norm": "softmax", "teacher_temperature": 2.0, "student_temperature": 0.5}]


@pytest.mark.parametrize("kw", CONFIGS, ids=["linear-other", "linear", "softmax-other-Tt2-Ts0.5"])
def test_loss_and_metrics_match_reference(kw: dict[str, Any], units: list[Unit], one_label: Unit, tok: Any,
                                          shared_cache: Path, contrary: torch.nn.Module) -> None:
    o = sharp(**kw)
    o.prepare(ctx_for([*units, one_label], tok, shared_cache))  # norm, temperatures, other bucket: same table
    cfg, student = o.cfg, contrary
    for us in (units, [one_label]):
        batch = batch_of(us, tok, False)
        n = o.num_items(batch)
        with torch.no_grad():
            loss, m = o.loss(student, batch, n)
            logits, labels = label_logits(student, batch)
        lp = torch.log_softmax(logits.double(), -1)
        t_ids = torch.cat([o.table[u.sid][0] for u in us])
        t_lp = torch.cat([o.table[u.sid][1] for u in us])
        ref = reference_kl(lp, t_ids, t_lp, cfg.norm, cfg.teacher_temperature, cfg.student_temperature, cfg.other_token)
        assert labels.numel() == n == sum(x != -100 for u in us for x in u.labels)
        assert loss.item() == pytest.approx(ref.sum().item() / n, rel=1e-5)  # one_label: num_items 1
        assert set(m) == {"kl", "teacher_topk_mass", "nll", "tokens"}
        assert m["tokens"] == float(n)
        assert m["kl"] == pytest.approx(ref.sum().item() / n, rel=1e-5)
        assert m["teacher_topk_mass"] == pytest.approx(t_lp.double().exp().sum().item() / n, rel=1e-6)
        assert m["nll"] == pytest.approx(-lp[torch.arange(n), labels].sum().item() / n, rel=1e-6)


def test_progress_silent_when_quiet_counts_units_otherwise(units: list[Unit], one_label: Unit, tok: Any,
                                                           shared_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ctx = ctx_for([*units, one_label], tok, shared_cache)
    sharp().prepare(ctx)
    assert capsys.readouterr() == ("", "")
    sharp().prepare(dataclasses.replace(ctx, quiet=False))
    assert re.search(r"(?<!\d)6/6(?!\d)", capsys.readouterr().out)  # all six units done, of six


def test_prepare_writes_meta_and_shards(units: list[Unit], one_label: Unit, tok: Any, shared_cache: Path) -> None:
    [cache] = (shared_cache / "distill").iterdir()
    assert sorted(f.name for f in cache.iterdir()) == ["meta.json", "part-00000.pt"]
    assert json.loads((cache / "meta.json").read_text()) == {"teacher": SHARP, "top_k": 5, "vocab_size": len(tok)}
    part = torch.load(cache / "part-00000.pt", weights_only=True)
    o = sharp()
    o.prepare(ctx_for([*units, one_label], tok, shared_cache))
    assert set(part) == set(o.table) == {0, 1, 2, 3, 4, 5}
    for sid, (ids, lps) in part.items():
        assert torch.equal(ids, o.table[sid][0]) and torch.equal(lps, o.table[sid][1])
    assert part[5][0].shape == (1, 5) and part[5][0].dtype == torch.int32 and part[5][1].dtype == torch.float32


class _Planted:
    """A pickle that runs code when loaded without weights_only."""

    ran: typing.ClassVar[list[str]] = []

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Planted.ran.append, ("code ran",))


def test_tampered_shard_is_refused_not_executed(units: list[Unit], one_label: Unit, tok: Any, tmp_path: Path,
                                                shared_cache: Path) -> None:
    shutil.copytree(shared_cache, tmp_path, dirs_exist_ok=True)
    [part] = (tmp_path / "distill").glob("*/part-00000.pt")
    torch.save({5: _Planted()}, part)
    with pytest.raises(pickle.UnpicklingError):
        sharp().prepare(ctx_for([*units, one_label], tok, tmp_path))
    assert _Planted.ran == []


# --------------------------------------------------------------------- teacher loading and the table's key

UNSET = object()


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch, make_model: Any) -> list[tuple[str, str, Any, torch.nn.Module]]:
    """models.load_model stubbed with the tiny model (in train mode, as a loader might hand it): each call's
    (name, dtype, device, model)."""
    calls: list[tuple[str, str, Any, torch.nn.Module]] = []

    def load(cfg: Any, device: Any = UNSET) -> Any:
        model = make_model().train()
        calls.append((cfg.name, cfg.dtype, device, model))
        return model, None

    monkeypatch.setattr(models, "load_model", load)
    return calls


def test_cache_key_follows_teacher_files_and_precision(one_label: Unit, tok: Any, tmp_path: Path,
                                                       loads: list[Any]) -> None:
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"v1")
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

    def prepare(autocast: Any = contextlib.nullcontext) -> int:
        o = OBJECTIVES.get("distill")(DistillConfig(teacher=str(folder)))
        o.prepare(dataclasses.replace(ctx_for([one_label], tok, tmp_path / "cache"), autocast=autocast))
        return len(loads)

    assert [prepare(), prepare()] == [1, 1]  # same files: the cached table, no teacher load
    (folder / "model.safetensors").write_bytes(b"v2, re-exported")
    assert [prepare(), prepare()] == [2, 2]
    assert [prepare(bf16), prepare(bf16), prepare()] == [3, 3, 3]  # bf16 autocast has its own table
    assert [c[:3] for c in loads] == [(str(folder), "float32", "cpu")] * 3
    for *_, teacher in loads:  # loaded for inference: eval mode, no gradients
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_local_teacher_fingerprint(tmp_path: Path) -> None:
    """What identifies a local teacher in the key: its files' names, sizes and mtimes (a .gguf: the file)."""
    gguf, folder = tmp_path / "t.gguf", tmp_path / "hf"
    gguf.write_bytes(b"12345")
    folder.mkdir()
    (folder / "b.bin").write_bytes(b"xy")
    (folder / "a.json").write_bytes(b"{}!")
    (folder / "sub").mkdir()
    (folder / "sub" / "w.safetensors").write_bytes(b"wwww")  # weights in a subfolder count too
    st = {f: f.stat().st_mtime_ns for f in (gguf, folder / "a.json", folder / "b.bin", folder / "sub" / "w.safetensors")}
    assert D._fingerprint(str(gguf)) == [["t.gguf", 5, st[gguf]]]
    assert D._fingerprint(str(folder)) == [["a.json", 3, st[folder / "a.json"]], ["b.bin", 2, st[folder / "b.bin"]],
                                           ["sub/w.safetensors", 4, st[folder / "sub" / "w.safetensors"]]]
    assert D._fingerprint(str(tmp_path / "hub-org/model")) == []  # a hub id or preset: its name alone


@pytest.mark.parametrize("self_distil", [False, True], ids=["teacher", "self"])
@pytest.mark.parametrize("quirk", ["stale-config-vocab", "no-output-embeddings"])
def test_vocab_size_is_the_teacher_logits_width(self_distil: bool, quirk: str, one_label: Unit, tok: Any,
                                                tmp_path: Path, make_model: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The vocabulary recorded (and checked against the student's logits) is the head's width; the config's
    vocab_size only when the model exposes no output embeddings (its forward then gives the logits)."""
    teacher = make_model()
    if quirk == "stale-config-vocab":
        teacher.config.vocab_size = 7
    else:
        teacher.get_output_embeddings = lambda: None
    base = teacher if self_distil else None
    if not self_distil:
        monkeypatch.setattr(models, "load_model", lambda cfg, device="cpu": (teacher, None))
    o = OBJECTIVES.get("distill")(DistillConfig(teacher=None if self_distil else "a-teacher"))
    o.prepare(dataclasses.replace(ctx_for([one_label], tok, tmp_path), model=base))
    [meta] = (tmp_path / "distill").glob("*/meta.json")
    name = "the base model (self-distillation)" if self_distil else "a-teacher"
    assert json.loads(meta.read_text()) == {"teacher": name, "top_k": 5, "vocab_size": len(tok)}
    with torch.no_grad():
        loss, m = o.loss(teacher, batch_of([one_label], tok, False), 1)
    assert m["tokens"] == 1.0 and loss.item() < 1e-6  # the teacher as student: no vocabulary error, KL 0
