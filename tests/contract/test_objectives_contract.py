"""Generic checks every registered objective passes: defaults validate, finite loss and gradients on a tiny
batch of its `batch_format`, normalisation by `num_items`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.objectives import OBJECTIVES
from tunelab.objectives._base import Objective

NAMES = OBJECTIVES.names()


def batch_for(fmt: str, request: pytest.FixtureRequest, packed: bool) -> dict[str, torch.Tensor]:
    if fmt == "sft":
        return request.getfixturevalue("packed_batch" if packed else "sft_batch")
    pytest.fail(f"no contract batch for batch_format '{fmt}': add a builder for it here")


def make(name: str) -> Objective:
    cls = OBJECTIVES.get(name)
    return cls(cls.Config.model_validate({"name": name}))


@pytest.mark.parametrize("name", NAMES)
def test_defaults_validate_and_flags(name: str) -> None:
    cls = OBJECTIVES.get(name)
    cfg = cls.Config()
    assert cfg.name == name  # type: ignore[attr-defined]
    assert cls.Config.model_validate(cfg.model_dump()) == cfg
    assert cls.batch_format in ("sft", "pairwise", "ranked", "unpaired", "prompt_only")
    assert isinstance(cls.needs_reference, bool) and isinstance(cls.needs_generation, bool)
    assert OBJECTIVES.describe(name)["summary"]


def test_registry_names_match_files() -> None:
    import tunelab.objectives as pkg

    files = {p.stem for p in Path(pkg.__file__).parent.glob("*.py") if not p.stem.startswith("_")}
    assert set(NAMES) == files


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", NAMES)
def test_finite_loss_and_grads(name: str, packed: bool, make_model: Any, request: pytest.FixtureRequest) -> None:
    obj = make(name)
    batch = batch_for(obj.batch_format, request, packed)
    model = make_model().train()
    n = obj.num_items(batch)
    assert isinstance(n, int) and n > 0
    loss, metrics = obj.loss(model, batch, n)
    assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss)
    assert all(isinstance(v, float) and v == v for v in metrics.values())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_loss_scales_with_num_items(name: str, make_model: Any, request: pytest.FixtureRequest) -> None:
    """num_items is the step-wide normaliser: doubling it halves the loss (what accumulation relies on)."""
    obj = make(name)
    batch = batch_for(obj.batch_format, request, packed=False)
    model = make_model()
    with torch.no_grad():
        n = obj.num_items(batch)
        a, _ = obj.loss(model, batch, n)
        b, _ = obj.loss(model, batch, 2 * n)
    assert b.item() == pytest.approx(a.item() / 2, rel=1e-5)
