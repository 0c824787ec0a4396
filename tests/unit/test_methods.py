"""Tuning methods on the tiny model: which parameters train, LoRA identity/save/load/merge, peft pass-through."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.config import TrainConfig, validate
from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._base import count_params
from tunelab.objectives import OBJECTIVES
from tunelab.train.optim import build_optimizer, param_groups


def method_for(spec: dict[str, Any]) -> Any:
    cfg = validate({"method": spec}).method
    return METHODS.get(cfg.name)(cfg)  # type: ignore[attr-defined]


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def perturb_adapter(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Make a freshly applied adapter non-trivial (trained-looking) without training."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def one_step(model: Any, batch: dict[str, torch.Tensor], lr: float = 1e-2) -> float:
    model.train()
    obj = OBJECTIVES.get("sft")(OBJECTIVES.config_class("sft")())
    opt = build_optimizer(param_groups(model, lr, 0.0), TrainConfig(lr=lr))
    loss, _ = obj.loss(model, batch, obj.num_items(batch))
    loss.backward()
    opt.step()
    return loss.item()


LAYER0 = {
    f"model.layers.0.{m}.weight"
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
}
LAYER1 = {n.replace("layers.0", "layers.1") for n in LAYER0}
NORMS = {n for n in LAYER0 | LAYER1 if "layernorm" in n}


# --------------------------------------------------------------------------------------------- full / freeze


def test_full_trains_everything(model: Any) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    out = method_for({"name": "full"}).tune(model)
    assert trainable(out) == {n for n, _ in model.named_parameters()}
    t, total = count_params(out)
    assert t == total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"top_layers": 1}, LAYER1),
        ({"top_layers": 2}, LAYER0 | LAYER1),
        ({"freeze_bottom": 1}, LAYER1),
        ({"freeze_bottom": 0}, LAYER0 | LAYER1),
        ({"top_layers": 1, "norms": False}, LAYER1 - NORMS),
        ({"embeddings": True}, {"model.embed_tokens.weight"}),
        ({"top_layers": 1, "embeddings": True}, LAYER1 | {"model.embed_tokens.weight"}),
        ({"patterns": [r"self_attn\.q_proj"]}, {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"}),
        ({"patterns": [r"^model\.norm\."]}, {"model.norm.weight"}),
        ({"top_layers": 2, "exclude": [r"\.mlp\."]}, {n for n in LAYER0 | LAYER1 if ".mlp." not in n}),
    ],
)
def test_freeze_selects_the_right_params(model: Any, spec: dict, expected: set[str]) -> None:
    out = method_for({"name": "freeze", **spec}).tune(model)
    assert trainable(out) == expected


def test_freeze_errors(model: Any) -> None:
    with pytest.raises(UserError, match="either top_layers or freeze_bottom"):
        method_for({"name": "freeze", "top_layers": 1, "freeze_bottom": 1}).tune(model)
    with pytest.raises(UserError, match="no parameter to train"):
        method_for({"name": "freeze", "top_layers": 0}).tune(model)


# --------------------------------------------------------------------------------------------- lora


def test_lora_trains_only_adapters_on_all_linear(make_model: Any) -> None:
    shapes = {n: p.shape for n, p in make_model().named_parameters()}
    out = method_for({"name": "lora", "r": 4}).tune(make_model())
    names = trainable(out)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    # all-linear: the seven projections of both layers, never the LM head
    assert len(names) == 2 * 7 * 2
    assert not any("lm_head" in n or "embed" in n for n in names)
    t, total = count_params(out)
    assert t == 2 * sum(4 * (shapes[n][0] + shapes[n][1]) for n in LAYER0 - NORMS)
    assert 0 < t < total


def test_lora_target_list_and_rank(model: Any) -> None:
    out = method_for({"name": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]}).tune(model)
    names = trainable(out)
    assert len(names) == 2 * 2 * 2 and all("q_proj" in n or "v_proj" in n for n in names)
    a = dict(out.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert a.shape == (2, 64)


@pytest.mark.parametrize("extra", [{}, {"dora": True}, {"rslora": True}, {"init": "gaussian"}])
def test_lora_identity_at_init(make_model: Any, sft_batch: dict, extra: dict) -> None:
    base = logits(make_model(), sft_batch)
    tuned = method_for({"name": "lora", "r": 4, **extra}).tune(make_model())
    assert torch.allclose(logits(tuned, sft_batch), base, atol=1e-5, rtol=0)


def test_lora_is_not_identity_after_perturbation(make_model: Any, sft_batch: dict) -> None:
    base = logits(make_model(), sft_batch)
    tuned = method_for({"name": "lora", "r": 4}).tune(make_model())
    perturb_adapter(tuned)
    assert (logits(tuned, sft_batch) - base).abs().max() > 1e-3


def test_lora_save_final_round_trip_with_peft(make_model: Any, sft_batch: dict, tmp_path: Path) -> None:
    from peft import PeftModel

    method = method_for({"name": "lora", "r": 4})
    tuned = method.tune(make_model())
    perturb_adapter(tuned)
    want = logits(tuned, sft_batch)
    method.save_final(tuned, tmp_path / "final")
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(make_model(), str(tmp_path / "final"))
    assert torch.equal(logits(loaded, sft_batch), want)  # fp32 save -> load: the same bits
    again = method.restore(make_model(), tmp_path / "final")
    assert torch.equal(logits(again, sft_batch), want)


def test_lora_merge_equals_unmerged(make_model: Any, sft_batch: dict) -> None:
    method = method_for({"name": "lora", "r": 4})
    assert method.mergeable
    tuned = method.tune(make_model())
    perturb_adapter(tuned)
    want = logits(tuned, sft_batch)
    merged = method.merged(tuned)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert torch.allclose(logits(merged, sft_batch), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "spec",
    [{"name": "lora", "target_modules": ["no_such_proj"]}, {"name": "lora", "target_modules": r".*\.nothing$"},
     {"name": "peft", "type": "ia3", "target_modules": ["no_such_proj"], "feedforward_modules": []}],
    ids=["lora-list", "lora-regex", "peft-ia3"],
)
def test_target_modules_matching_nothing(model: Any, spec: dict) -> None:
    with pytest.raises(UserError) as e:
        method_for(spec).tune(model)
    assert "does not apply to this model" in str(e.value) and "\n" not in str(e.value)


def test_qlora_needs_bitsandbytes_and_cuda(model: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU message")
    with pytest.raises(UserError, match="bitsandbytes and a CUDA GPU"):
        method_for({"name": "lora", "quantize": "4bit"}).tune(model)


# --------------------------------------------------------------------------------------------- peft pass-through

PEFT_TYPES = {
    "ia3": {},
    "loha": {"r": 4},
    "lokr": {"r": 4},
    "vera": {"r": 8},
    "prompt_tuning": {"num_virtual_tokens": 4},
}


@pytest.mark.parametrize("ptype", list(PEFT_TYPES))
def test_peft_pass_through_builds_and_trains(model: Any, sft_batch: dict, ptype: str) -> None:
    method = method_for({"name": "peft", "type": ptype, **PEFT_TYPES[ptype]})
    tuned = method.tune(model)
    names = trainable(tuned)
    assert names and method.saved_format == "peft"
    assert all(".default" in n for n in names)  # adapter parameters only; base weights stay frozen
    assert not any(p.requires_grad for n, p in tuned.named_parameters() if ".default" not in n)
    before = {n: p.detach().clone() for n, p in tuned.named_parameters() if p.requires_grad}
    loss = one_step(tuned, sft_batch)
    assert torch.isfinite(torch.tensor(loss))
    after = dict(tuned.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_peft_fields_are_passed_to_peft(model: Any) -> None:
    tuned = method_for({"name": "peft", "type": "lokr", "r": 4, "target_modules": ["q_proj"]}).tune(model)
    cfg = tuned.peft_config["default"]
    assert cfg.r == 4 and set(cfg.target_modules) == {"q_proj"}
    assert all("q_proj" in n for n in trainable(tuned))


def test_peft_unknown_field_suggests() -> None:
    with pytest.raises(UserError) as e:
        validate({"method": {"name": "peft", "type": "ia3", "target_modulez": ["k_proj"]}})
    assert "method.target_modulez" in str(e.value) and "did you mean 'method.target_modules'" in str(e.value)


def test_peft_unknown_type_suggests() -> None:
    with pytest.raises(UserError, match="unknown peft type 'ia4'; did you mean 'ia3'"):
        validate({"method": {"name": "peft", "type": "ia4"}})


def test_peft_type_is_required() -> None:
    with pytest.raises(UserError, match="method.type"):
        validate({"method": {"name": "peft"}})


def test_peft_mergeable_follows_type() -> None:
    assert method_for({"name": "peft", "type": "ia3"}).mergeable
    pt = method_for({"name": "peft", "type": "prompt_tuning", "num_virtual_tokens": 2})
    assert not pt.mergeable
    with pytest.raises(NotImplementedError, match="cannot be folded"):
        pt.merged(torch.nn.Linear(1, 1))


def test_prompt_learning_types_refuse_packing() -> None:
    """peft drops position_ids for prompt tuning, so packed samples would silently attend to each other."""
    assert method_for({"name": "peft", "type": "prompt_tuning", "num_virtual_tokens": 2}).supports_packing is False
    assert method_for({"name": "peft", "type": "prefix_tuning", "num_virtual_tokens": 2}).supports_packing is False
    assert method_for({"name": "peft", "type": "ia3"}).supports_packing is True
    assert method_for({"name": "lora"}).supports_packing is True


def test_prompt_tuning_with_packing_is_refused_by_the_loop(tmp_path: Path) -> None:
    from conftest import chat_rows, write_jsonl

    from tunelab.train.loop import train

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    cfg = validate({
        "model": {"name": "tiny-llama"}, "out": str(tmp_path / "run"), "data": {"train": str(data), "valid_size": 0},
        "method": {"name": "peft", "type": "prompt_tuning", "num_virtual_tokens": 2},
        "train": {"max_steps": 1, "tensorboard": False}, "eval": {"before": False, "after": False},
    })
    with pytest.raises(UserError, match="data.packing=false"):
        train(cfg, quiet=True)


def test_freeze_on_a_bert_classifier() -> None:
    """Telly-style freezing (embeddings + bottom K blocks frozen) on a BERT-style encoder, with its task head."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                     num_labels=2)
    torch.manual_seed(0)
    model = method_for({"name": "freeze", "freeze_bottom": 1, "patterns": ["^classifier\\.", "^bert\\.pooler\\."]}).tune(
        BertForSequenceClassification(cfg))
    names = trainable(model)
    assert names and not any("embeddings" in n or ".layer.0." in n for n in names)
    assert any(".layer.1." in n for n in names) and any(".layer.2." in n for n in names)
    assert {"classifier.weight", "classifier.bias"} <= set(names)
    ids = torch.randint(0, 100, (2, 6))
    loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, torch.tensor([0, 1]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_full_weights_with_a_missing_tensor_are_refused(make_model: Any, tmp_path: Path) -> None:
    """A final/ that lacks tensors must not load silently with the base's values in their place."""
    from safetensors.torch import load_file, save_file

    method = method_for({"name": "full"})
    method.save_final(method.tune(make_model()), tmp_path / "final")
    (f,) = sorted((tmp_path / "final").glob("*.safetensors"))
    state = load_file(f)
    dropped = sorted(state)[3]
    save_file({k: v for k, v in state.items() if k != dropped}, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lack 1 tensors"):
        method.restore(make_model(), tmp_path / "final")
    save_file({**state, "model.not_a_weight": torch.zeros(1)}, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="do not fit the base model"):
        method.restore(make_model(), tmp_path / "final")
