"""Every peft type `tunelab list methods` offers, tried as a new user would: `{name: peft, type: T}` on its
defaults on the tiny model. Each either trains (loss finite, only its own parameters move, save -> restore gives
the same logits) or stops with one UserError naming the `method.<field>` to set. Which types refuse on the tiny
model is pinned, so a type that silently starts failing (or starts working) shows up here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods.peft import UNAVAILABLE, peft_types, usable_types
from tunelab.objectives import OBJECTIVES

# defaults that do not fit a hidden-64 model (or need a user's input), with the field the error must name
REFUSE_ON_TINY = {
    "adamss": "method.type",  # needs scikit-learn, not installed in the test environment
    "c3a": "method.block_size",
    "road": "method.group_size",
    "shira": "method.r",
    "trainable_tokens": "method.token_indices",
    "vblora": "method.vector_length",
    "waveft": "method.n_frequency",
    "xlora": "method.adapters",
}


def make(ptype: str) -> Any:
    cls = METHODS.get("peft")
    method = cls(cls.Config.model_validate({"name": "peft", "type": ptype}))
    method.total_steps = 4  # as the loop sets it
    return method


def logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return out[:, -batch["input_ids"].shape[1] :]


@pytest.mark.parametrize("ptype", usable_types())
def test_type_trains_or_names_the_field(ptype: str, make_model: Any, sft_batch: dict, tmp_path: Path) -> None:
    if ptype in REFUSE_ON_TINY:
        with pytest.raises(UserError, match=REFUSE_ON_TINY[ptype].replace(".", r"\.")) as e:
            make(ptype).tune(make_model())  # config-time refusals raise in make() already
        assert "\n" not in str(e.value)
        return
    method = make(ptype)
    model = method.tune(make_model())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    obj = OBJECTIVES.get("sft")(OBJECTIVES.config_class("sft")())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(2):
        loss, _ = obj.loss(model, dict(sft_batch), obj.num_items(sft_batch))
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        method.after_step(step, model)
        opt.zero_grad(set_to_none=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= trainable
    want = logits(model, sft_batch)
    method.save_final(model, tmp_path / "final")
    assert torch.equal(logits(method.restore(make_model(), tmp_path / "final"), sft_batch), want)


def test_config_time_refusals_are_one_line() -> None:
    for ptype in ("trainable_tokens", "xlora"):
        with pytest.raises(UserError, match=REFUSE_ON_TINY[ptype].replace(".", r"\.")):
            make(ptype)


def test_unavailable_types_are_not_offered_and_say_why() -> None:
    from tunelab.listing import render

    listing = render("methods")
    for ptype, why in UNAVAILABLE.items():
        assert ptype in peft_types() and ptype not in usable_types()
        assert f"not offered: {ptype} ({why})" in listing
        with pytest.raises(UserError, match="single-task"):
            make(ptype)


def test_adalora_gets_the_runs_steps_and_allocates_ranks(make_model: Any, sft_batch: dict) -> None:
    method = make("adalora")
    method.total_steps = 6
    model = method.tune(make_model())
    assert model.peft_config["default"].total_step == 6
    state = method.extra_state(model)
    assert set(state) == {"ipt", "exp_avg_ipt", "exp_avg_unc", "rank_pattern"}


def test_prompt_learning_defaults_fill_virtual_tokens() -> None:
    for ptype in ("prompt_tuning", "prefix_tuning", "p_tuning", "cartridge"):
        method = make(ptype)
        assert method.virtual_tokens == 20 and method.needs_model_forward and not method.supports_packing
    assert make("lora").virtual_tokens == 0 and not make("lora").needs_model_forward


@pytest.mark.parametrize("ptype", ["prefix_tuning", "prompt_tuning", "p_tuning"])
def test_prompt_learning_generation_uses_the_prompt(ptype: str, make_model: Any, tok: Any, tmp_path: Path) -> None:
    """Greedy decoding through the hf backend equals a greedy loop over the model's forward (peft's generate
    silently dropped a prefix on transformers 5 until tunelab renamed the cache for it), also after a restore."""
    from test_method_mam import backend_greedy, greedy_by_forward

    from tunelab.generate.backends.hf import eos_ids

    method = make(ptype)
    model = method.tune(make_model())
    with torch.no_grad():  # a prompt strong enough to change the greedy tokens
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 3.0)
    model.eval()
    rows = [tok.encode("def add(a, b):"), tok.encode("x")]
    eos = eos_ids(model, tok)
    method.save_final(model, tmp_path / "final")
    for m in (model, method.restore(make_model(), tmp_path / "final").eval()):
        got = backend_greedy(m, tok, rows, 5)
        for i, prompt in enumerate(rows):
            want = greedy_by_forward(m, prompt, 5, eos)
            assert got[i].text == tok.decode(want, skip_special_tokens=True), f"{ptype} row {i}"
    ids = torch.tensor([rows[0]])
    assert not torch.allclose(logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
                              logits(make_model(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}), atol=1e-3)


@pytest.mark.parametrize("ptype", [t for t in usable_types() if t not in REFUSE_ON_TINY])
def test_identity_at_init_is_declared_exactly(ptype: str, make_model: Any, sft_batch: dict) -> None:
    """The declaration is checked both ways, so the contract suite's identity test runs for every type that
    claims it and no type that starts elsewhere claims it."""
    method = make(ptype)
    same = torch.allclose(logits(method.tune(make_model()), sft_batch), logits(make_model(), sft_batch), atol=1e-5, rtol=0)
    assert same is method.identity_at_init, f"{ptype}: equals the base at init: {same}, declared: {method.identity_at_init}"
