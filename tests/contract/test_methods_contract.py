"""Generic checks every registered method passes, with no per-method test code.

Parametrised over METHODS.names() plus a few peft pass-through types. A method whose defaults do not yet
select anything to train (freeze) or that has a required field (peft: type) gets its minimal settings from
MINIMAL; every other new method runs on its defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.config import TrainConfig
from tunelab.methods import METHODS
from tunelab.objectives import OBJECTIVES
from tunelab.train.optim import build_optimizer, param_groups

MINIMAL: dict[str, dict[str, Any]] = {"freeze": {"top_layers": 1}, "peft": {"type": "lora", "r": 4}}
PEFT_TYPES: dict[str, dict[str, Any]] = {
    "ia3": {},
    "loha": {"r": 4},
    "lokr": {"r": 4},
    "vera": {"r": 8},
    "prompt_tuning": {"num_virtual_tokens": 4},
}
CASES = [(n, MINIMAL.get(n, {})) for n in METHODS.names()] + [("peft", {"type": t, **kw}) for t, kw in PEFT_TYPES.items()]
IDS = [n if n != "peft" else f"peft-{kw['type']}" for n, kw in CASES]


@pytest.fixture(params=CASES, ids=IDS)
def case(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param


def make(case: tuple[str, dict[str, Any]]) -> Any:
    name, fields = case
    cls = METHODS.get(name)
    return cls(cls.Config.model_validate({"name": name, **fields}))


def logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def train_step(model: Any, batch: dict[str, torch.Tensor]) -> None:
    model.train()
    obj = OBJECTIVES.get("sft")(OBJECTIVES.config_class("sft")())
    opt = build_optimizer(param_groups(model, 1e-2, 0.0), TrainConfig(lr=1e-2))
    loss, _ = obj.loss(model, batch, obj.num_items(batch))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_config_defaults_validate() -> None:
    for name in METHODS.names():
        cls = METHODS.get(name)
        cfg = cls.Config.model_validate({"name": name, **MINIMAL.get(name, {})})
        assert cfg.name == name  # type: ignore[attr-defined]
        assert cls.Config.model_config.get("extra") in ("forbid", "allow")
        assert METHODS.describe(name)["summary"], f"{name}: no docstring summary"
        # fields with defaults serialise and validate back
        assert cls.Config.model_validate(cfg.model_dump()) == cfg


def test_registry_names_match_files() -> None:
    import tunelab.methods as pkg

    files = {p.stem for p in Path(pkg.__file__).parent.glob("*.py") if not p.stem.startswith("_")}
    assert set(METHODS.names()) == files


def test_apply_gives_trainable_params(case: tuple, make_model: Any) -> None:
    model = make(case).apply(make_model())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) >= 1 and sum(p.numel() for p in trainable) > 0


def test_identity_at_init_where_claimed(case: tuple, make_model: Any, sft_batch: dict) -> None:
    method = make(case)
    if not method.identity_at_init:
        pytest.skip(f"{case[0]} does not claim identity at init")
    base = logits(make_model(), sft_batch)
    assert torch.allclose(logits(method.apply(make_model()), sft_batch), base, atol=1e-5, rtol=0)


def test_step_changes_only_trainable_params(case: tuple, make_model: Any, sft_batch: dict) -> None:
    model = make(case).apply(make_model())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, sft_batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed, "a training step changed nothing"
    assert changed <= trainable, f"frozen params changed: {sorted(changed - trainable)[:3]}"


def test_save_final_load_final_round_trip(case: tuple, make_model: Any, sft_batch: dict, tmp_path: Path) -> None:
    method = make(case)
    model = method.apply(make_model())
    train_step(model, sft_batch)
    want = logits(model, sft_batch)
    method.save_final(model, tmp_path / "final")
    loaded = method.load_final(make_model(), tmp_path / "final")
    assert torch.allclose(logits(loaded, sft_batch), want, atol=1e-5, rtol=0)
    if method.is_peft:
        from peft import PeftModel

        assert isinstance(loaded, PeftModel)


def test_merge_equals_unmerged_where_claimed(case: tuple, make_model: Any, sft_batch: dict) -> None:
    method = make(case)
    if not method.mergeable:
        pytest.skip(f"{IDS[CASES.index(case)]} is not mergeable")
    model = method.apply(make_model())
    train_step(model, sft_batch)
    want = logits(model, sft_batch)
    merged = method.merged(model)
    assert not hasattr(merged, "peft_config")
    assert torch.allclose(logits(merged, sft_batch), want, atol=1e-5, rtol=0)
