"""Generic checks every registered method passes, with no per-method test code.

Parametrised over METHODS.names() plus a few peft pass-through types. A method whose defaults do not yet
select anything to train (freeze) or that has a required field (peft: type) gets its minimal settings from
MINIMAL; every other new method runs on its defaults. A method that needs a finished run (graft: a fine-tuned
model) gets one from NEEDS_RUN, built once per session with the real loop. As in the loop, a method that asks
for calibration batches is `prepare`d before `tune`, and `finalize` runs before `save_final`. The training step
uses the method's own parameter groups and `on_step` hook. Second architectures (tiny Qwen2, GPT-2) run the core
checks too.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.config import TrainConfig
from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._base import count_params
from tunelab.models.presets import PRESETS
from tunelab.objectives import OBJECTIVES
from tunelab.train.optim import build_optimizer

MINIMAL: dict[str, dict[str, Any]] = {
    "freeze": {"top_layers": 1}, "peft": {"type": "lora", "r": 4},
    "bitfit": {"add_biases": True},  # Llama has no biases: BitFit refuses to train nothing unless told to add them
    "graft": {"finetuned": "runs/finetuned"},  # replaced by a real run from NEEDS_RUN in make()
}
PEFT_TYPES: dict[str, dict[str, Any]] = {
    "ia3": {},
    "loha": {"r": 4},
    "lokr": {"r": 4},
    "vera": {"r": 8},
    "prompt_tuning": {"num_virtual_tokens": 4},
}
NO_CONV1D = {"loha", "lokr"}  # peft types without GPT-2 Conv1D support
CASES = [(n, MINIMAL.get(n, {})) for n in METHODS.names()] + [("peft", {"type": t, **kw}) for t, kw in PEFT_TYPES.items()]
IDS = [n if n != "peft" else f"peft-{kw['type']}" for n, kw in CASES]


@pytest.fixture(params=CASES, ids=IDS)
def case(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param


@functools.cache
def _runs_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="tunelab-contract-runs-")


@functools.cache
def finetuned_run(arch: str) -> Path:
    """A finished full fine-tuning run of `arch` (2 steps of the real loop), built once per session."""
    from tunelab.config import validate
    from tunelab.train.loop import train

    out = Path(_runs_dir().name) / f"full-{arch}"
    cfg = validate({
        "model": {"name": arch}, "out": str(out), "data": {"train": "builtin:code_instructions", "limit": 8, "valid_size": 0},
        "method": {"name": "full"}, "eval": {"before": False, "after": False},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-2, "warmup_ratio": 0, "scheduler": "constant",
                  "mixed_precision": "no", "tensorboard": False},
    })
    with torch.random.fork_rng(devices=[]):  # the loop seeds the global RNG
        train(cfg, quiet=True)
    return out


#: methods whose config names a finished run: fields built for the model architecture under test
NEEDS_RUN: dict[str, Callable[[str], dict[str, Any]]] = {"graft": lambda arch: {"finetuned": str(finetuned_run(arch))}}


def make(case: tuple[str, dict[str, Any]], arch: str = "tiny-llama") -> Any:
    name, fields = case
    cls = METHODS.get(name)
    extra = NEEDS_RUN[name](arch) if name in NEEDS_RUN else {}
    return cls(cls.Config.model_validate({"name": name, **fields, **extra}))


def tune(method: Any, model: Any) -> Any:
    """`method.tune` as the loop calls it: a method that measures the base model first gets calibration batches."""
    if method.calibration_batches:
        ids = torch.randint(3, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
        method.prepare(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    return method.tune(model)


def logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return out[:, -batch["input_ids"].shape[1] :]  # a soft prompt adds leading positions


def train_step(method: Any, model: Any, batch: dict[str, torch.Tensor], step: int = 0) -> None:
    """One optimizer step as the loop takes it: the method's own groups and its per-step hook."""
    model.train()
    obj = OBJECTIVES.get("sft")(OBJECTIVES.config_class("sft")())
    groups = method.param_groups(model, 1e-2, 0.0)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert {id(p) for p in model.parameters() if p.requires_grad} <= grouped, "trainable params missing from the method's groups"
    opt = build_optimizer(groups, TrainConfig(lr=1e-2))
    method.on_step(step, 10, model, opt)
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
    method = make(case)
    model = tune(method, make_model())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) >= 1 and sum(p.numel() for p in trainable) > 0


def test_trainable_count_matches_the_methods_formula(case: tuple, make_model: Any) -> None:
    method = make(case)
    model = tune(method, make_model())
    expected = method.expected_trainable(model)
    if expected is None:
        pytest.skip(f"{case[0]}: a pass-through method (peft computes its own count)")
    assert count_params(model)[0] == expected


def test_flags_are_consistent(case: tuple) -> None:
    method = make(case)
    assert method.saved_format in ("full", "peft", "tunelab")
    assert method.virtual_tokens >= 0
    if method.virtual_tokens:
        assert not method.supports_packing, "a method that prepends virtual tokens cannot train on packed rows"


def test_identity_at_init_where_claimed(case: tuple, make_model: Any, sft_batch: dict) -> None:
    method = make(case)
    if not method.identity_at_init:
        pytest.skip(f"{case[0]} does not claim identity at init")
    base = logits(make_model(), sft_batch)
    assert torch.allclose(logits(tune(method, make_model()), sft_batch), base, atol=1e-5, rtol=0)


def test_step_changes_only_trainable_params(case: tuple, make_model: Any, sft_batch: dict) -> None:
    method = make(case)
    model = tune(method, make_model())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(method, model, sft_batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    allowed = set(method.checkpoint_state(model))
    assert changed, "a training step changed nothing"
    assert changed <= allowed, f"params outside the method's state changed: {sorted(changed - allowed)[:3]}"


def test_save_final_load_final_round_trip(case: tuple, make_model: Any, sft_batch: dict, tmp_path: Path) -> None:
    method = make(case)
    model = tune(method, make_model())
    train_step(method, model, sft_batch)
    model = method.finalize(model)
    want = logits(model, sft_batch)
    method.save_final(model, tmp_path / "final")
    loaded = method.restore(make_model(), tmp_path / "final")
    assert torch.equal(logits(loaded, sft_batch), want)
    if method.saved_format == "peft":
        from peft import PeftModel

        assert isinstance(loaded, PeftModel)


def test_disabled_gives_the_base_outputs(case: tuple, make_model: Any, sft_batch: dict) -> None:
    method = make(case)
    if not method.can_disable:
        pytest.skip(f"{case[0]} trains weights in place (reference log-probs are precomputed)")
    base = logits(make_model(), sft_batch)
    model = tune(method, make_model())
    train_step(method, model, sft_batch)
    assert not torch.allclose(logits(model, sft_batch), base, atol=1e-6, rtol=0), "the step did not change the outputs"
    with method.disabled(model):
        assert torch.allclose(logits(model, sft_batch), base, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(model, sft_batch), base, atol=1e-6, rtol=0), "disabled() did not switch back on"


def test_unmergeable_methods_refuse_to_merge(case: tuple, make_model: Any) -> None:
    method = make(case)
    if method.mergeable:
        pytest.skip(f"{IDS[CASES.index(case)]} is mergeable (checked by test_merge_equals_unmerged_where_claimed)")
    with pytest.raises(NotImplementedError):
        method.merged(tune(method, make_model()))


@pytest.mark.parametrize("arch", ["tiny-qwen2", "tiny-gpt2"])
def test_second_architecture_trains_and_round_trips(case: tuple, arch: str, sft_batch: dict, tmp_path: Path) -> None:
    def fresh() -> Any:
        return PRESETS[arch].model(dtype=torch.float32).eval()

    method = make(case, arch)
    if arch == "tiny-gpt2" and case[0] == "peft" and case[1]["type"] in NO_CONV1D:
        with pytest.raises(UserError, match="does not apply to this model"):  # peft's limit, passed on as exit 2
            tune(method, fresh())
        return
    model = tune(method, fresh())
    expected = method.expected_trainable(model)
    assert expected is None or count_params(model)[0] == expected
    before = logits(model, sft_batch)
    train_step(method, model, sft_batch)
    assert not torch.equal(before, logits(model, sft_batch))
    model = method.finalize(model)
    want = logits(model, sft_batch)
    method.save_final(model, tmp_path / "final")
    assert torch.equal(logits(method.restore(fresh(), tmp_path / "final"), sft_batch), want)


def test_merge_equals_unmerged_where_claimed(case: tuple, make_model: Any, sft_batch: dict) -> None:
    method = make(case)
    if not method.mergeable:
        pytest.skip(f"{IDS[CASES.index(case)]} is not mergeable")
    model = tune(method, make_model())
    train_step(method, model, sft_batch)
    want = logits(model, sft_batch)
    merged = method.merged(model)
    assert not hasattr(merged, "peft_config")
    assert torch.allclose(logits(merged, sft_batch), want, atol=1e-5, rtol=0)
