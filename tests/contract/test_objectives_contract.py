"""Generic checks every registered objective passes, with no per-objective test code: defaults validate,
finite loss and gradients on real batches of its `batch_format` (padded and packed), normalisation by
`num_items`, and gradient accumulation equal to one big batch (where the objective claims it)."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import chat_rows, write_jsonl

from tunelab.config import DataConfig
from tunelab.data import tokenize_cached
from tunelab.data.batching import Unit, get_batcher
from tunelab.objectives import OBJECTIVES
from tunelab.objectives._base import Objective, PrepareContext
from tunelab.objectives._logprobs import SeqLogps, sequence_logps
from tunelab.train.reference import Reference

NAMES = OBJECTIVES.names()


def _rows(fmt: str) -> list[dict[str, Any]]:
    base = chat_rows(5)
    prompts = [r["messages"][0]["content"] for r in base]
    answers = [r["messages"][1]["content"] for r in base]
    wrong = [a.replace("return a", "return b") for a in answers]
    if fmt == "sft":
        return base
    if fmt == "pairwise":
        return [{"prompt": p, "chosen": a, "rejected": w} for p, a, w in zip(prompts, answers, wrong, strict=True)]
    if fmt == "ranked":  # k differs between prompts
        return [
            {"prompt": p, "responses": [w, a, "pass"][: 2 + i % 2], "scores": [0.0, 1.0, -1.0][: 2 + i % 2]}
            for i, (p, a, w) in enumerate(zip(prompts, answers, wrong, strict=True))
        ]
    if fmt == "unpaired":
        return [{"prompt": p, "completion": a if i % 2 == 0 else w, "label": i % 2 == 0} for i, (p, a, w) in enumerate(zip(prompts, answers, wrong, strict=True))]
    if fmt == "multi_target":
        return [{"prompt": p, "targets": [a, f"assert {a.split()[1].split('(')[0]}(1, 2) is not None"]} for p, a in zip(prompts, answers, strict=True)]
    if fmt == "feedback":  # good rows, bad rows with feedback, and a bad row without
        return [{"prompt": p, "attempt": a if i % 2 == 0 else w, "reward": i % 2 == 0,
                 "feedback": "" if i % 2 == 0 or i == 3 else "failed: AssertionError"} for i, (p, a, w) in enumerate(zip(prompts, answers, wrong, strict=True))]
    pytest.fail(f"no contract rows for batch_format '{fmt}': add them here")


_UNITS: dict[str, list[Unit]] = {}


def units_for(fmt: str, tok: Any, tmp: Path) -> list[Unit]:
    if fmt not in _UNITS:
        path = write_jsonl(tmp / f"{fmt}.jsonl", _rows(fmt))
        _UNITS[fmt] = tokenize_cached(str(path), tok, DataConfig(train=str(path), max_length=256), "train", fmt).samples
    return _UNITS[fmt]


def batch_of(fmt: str, units: list[Unit], tok: Any, packed: bool) -> dict[str, torch.Tensor]:
    rows = [units[: len(units) // 2], units[len(units) // 2 :]] if packed else [[u] for u in units]
    batch = get_batcher(fmt).collate([r for r in rows if r], tok.pad_token_id, packed)
    batch.pop("real_tokens")
    return batch


class FrozenCopy(Reference):
    """The model as it was when the reference was made (what a real reference provider gives)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()

    @torch.no_grad()
    def logps(self, model: Any, batch: dict[str, torch.Tensor]) -> SeqLogps:
        return sequence_logps(self.model, batch).detach()


def make(name: str) -> Objective:
    cls = OBJECTIVES.get(name)
    return cls(cls.Config.model_validate({"name": name}))


def _setup(name: str, tok: Any, tmp: Path, make_model: Any) -> tuple[Objective, list[Unit], Any, Reference | None]:
    obj = make(name)
    obj.on_step(5, 10)  # mid-run, so scheduled objectives (masked thought's ramp) are active
    units = units_for(obj.batch_format, tok, tmp)
    base = make_model()
    obj.prepare(PrepareContext(units, get_batcher(obj.batch_format), tok.pad_token_id, torch.device("cpu"), nullcontext, 4,
                               tmp / "prepare", quiet=True, model=base))
    model = make_model().train()
    ref = FrozenCopy(model) if obj.needs_reference else None
    return obj, units, model, ref


@pytest.mark.parametrize("name", NAMES)
def test_defaults_validate_and_flags(name: str) -> None:
    cls = OBJECTIVES.get(name)
    cfg = cls.Config()
    assert cfg.name == name  # type: ignore[attr-defined]
    assert cls.Config.model_validate(cfg.model_dump()) == cfg
    get_batcher(cls.batch_format)  # the data stage has a batcher for the declared format
    assert cls.loss_items in ("tokens", "units")
    assert isinstance(cls.needs_reference, bool)
    assert cls(cfg).online is None  # defaults train on data.train
    assert OBJECTIVES.describe(name)["summary"]


@pytest.mark.parametrize("name", [n for n in NAMES if "online" in OBJECTIVES.get(n).Config.model_fields])
def test_an_online_field_reaches_the_loop(name: str) -> None:
    """An objective whose config has `online` must expose it (the loop reads `Objective.online`, and would
    otherwise train on data.train without a word) and must turn judged samples into rows."""
    from tunelab.evaluate.tasks import TASKS

    cls = OBJECTIVES.get(name)
    cfg = cls.Config.model_validate({"name": name, "online": {"task": {"name": "codetasks", "path": "builtin:code_instructions"}}})
    obj = cls(cfg)
    assert obj.online is cfg.online  # type: ignore[attr-defined]
    task = TASKS.get("codetasks")(cfg.online.task)  # type: ignore[attr-defined]
    rows, counts = obj.rollout_rows(task, [], [])
    assert rows == [] and isinstance(counts, dict)


def test_registry_names_match_files() -> None:
    import tunelab.objectives as pkg

    files = {p.stem for p in Path(pkg.__file__).parent.glob("*.py") if not p.stem.startswith("_")}
    assert set(NAMES) == files


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", NAMES)
def test_finite_loss_and_grads(name: str, packed: bool, make_model: Any, tok: Any, tmp_path: Path) -> None:
    obj, units, model, ref = _setup(name, tok, tmp_path, make_model)
    batch = batch_of(obj.batch_format, units, tok, packed)
    n = obj.num_items(batch)
    assert isinstance(n, int) and n > 0
    loss, metrics = obj.loss(model, batch, n, ref)
    assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss)
    assert all(isinstance(v, float) and v == v for v in metrics.values())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_padded_equals_packed(name: str, make_model: Any, tok: Any, tmp_path: Path) -> None:
    """The layout is an implementation detail: padded rows and packed segments give the same loss."""
    obj, units, model, ref = _setup(name, tok, tmp_path, make_model)
    model.eval()
    with torch.no_grad():
        a, _ = obj.loss(model, batch_of(obj.batch_format, units, tok, False), 7, ref)
        b, _ = obj.loss(model, batch_of(obj.batch_format, units, tok, True), 7, ref)
    assert a.item() == pytest.approx(b.item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_loss_scales_with_num_items(name: str, make_model: Any, tok: Any, tmp_path: Path) -> None:
    """num_items is the step-wide normaliser: doubling it halves the loss (what accumulation relies on)."""
    obj, units, model, ref = _setup(name, tok, tmp_path, make_model)
    batch = batch_of(obj.batch_format, units, tok, packed=False)
    with torch.no_grad():
        n = obj.num_items(batch)
        a, _ = obj.loss(model, batch, n, ref)
        b, _ = obj.loss(model, batch, 2 * n, ref)
    assert b.item() == pytest.approx(a.item() / 2, rel=1e-5)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", NAMES)
def test_accumulation_equals_big_batch(name: str, make_model: Any, tok: Any, tmp_path: Path) -> None:
    obj, units, model, ref = _setup(name, tok, tmp_path, make_model)
    if not obj.accumulation_invariant:
        pytest.skip(f"{name} declares accumulation_invariant=False (a batch-level statistic; see its docstring)")
    fmt = obj.batch_format
    big = batch_of(fmt, units, tok, packed=False)
    micro = [batch_of(fmt, units[:1], tok, False), batch_of(fmt, units[1:], tok, False)]
    n = obj.num_items(big)
    assert sum(obj.num_items(b) for b in micro) == n
    loss_big, _ = obj.loss(model, big, n, ref)
    loss_big.backward()
    g_big = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_acc = 0.0
    for b in micro:
        loss, _ = obj.loss(model, b, n, ref)
        loss.backward()
        loss_acc += loss.item()
    g_acc = _grads(model)
    assert loss_acc == pytest.approx(loss_big.item(), rel=1e-5, abs=1e-6)
    for k in g_big:
        assert torch.allclose(g_acc[k], g_big[k], atol=1e-6, rtol=1e-4), k
