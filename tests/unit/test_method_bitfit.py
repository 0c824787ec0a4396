"""BitFit: which tensors train (by name) on tiny Llama, Qwen2, GPT-2 and a tiny BERT classifier; counts by hand;
added zero biases (identity at init, switchable off, round trip, no merge); the UserErrors for bias-free models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tunelab.config import TrainConfig
from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._base import count_params
from tunelab.methods.bitfit import out_width
from tunelab.models.presets import PRESETS
from tunelab.objectives import OBJECTIVES
from tunelab.train.optim import build_optimizer

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


def bitfit(**fields: Any) -> Any:
    cls = METHODS.get("bitfit")
    return cls(cls.Config.model_validate({"name": "bitfit", **fields}))


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def llama_names(layers: tuple[str, ...], suffix: str) -> set[str]:
    part = {m: "self_attn" if m in ATTN else "mlp" for m in ATTN + FFN}
    return {f"model.layers.{i}.{part[m]}.{m}.{suffix}" for i in (0, 1) for m in layers}


def logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def sft_step(method: Any, model: Any, batch: dict[str, torch.Tensor], lr: float = 1e-2) -> None:
    model.train()
    obj = OBJECTIVES.get("sft")(OBJECTIVES.config_class("sft")())
    opt = build_optimizer(method.param_groups(model, lr, 0.0), TrainConfig(lr=lr))
    loss, _ = obj.loss(model, batch, obj.num_items(batch))
    loss.backward()
    opt.step()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BertForSequenceClassification(cfg).eval()


# --------------------------------------------------------------------------------------------- Llama (no biases)


@pytest.mark.parametrize("variant", ["full", "partial"])
def test_llama_without_add_biases_is_a_user_error(make_model: Any, variant: str) -> None:
    with pytest.raises(UserError, match=r"method\.add_biases"):
        bitfit(variant=variant).tune(make_model())


def test_llama_full_adds_a_zero_bias_to_every_block_linear(make_model: Any, sft_batch: dict) -> None:
    base = make_model()
    base_names = {n for n, _ in base.named_parameters()}
    method = bitfit(add_biases=True)
    model = method.tune(make_model())
    assert trainable(model) == llama_names(ATTN + FFN, "tunelab_bias.bias")
    # per block q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 64 = 512 (GQA: k/v are 2 heads of 16)
    assert count_params(model)[0] == method.expected_trainable(model) == 2 * 512
    assert base_names <= {n for n, _ in model.named_parameters()}  # base tensors keep their names
    assert torch.equal(logits(model, sft_batch), logits(base, sft_batch))
    assert method.saved_format == "tunelab" and not method.mergeable and method.can_disable


def test_llama_partial_trains_query_gate_and_up_biases(make_model: Any) -> None:
    method = bitfit(variant="partial", add_biases=True)
    model = method.tune(make_model())
    assert trainable(model) == llama_names(("q_proj", "gate_proj", "up_proj"), "tunelab_bias.bias")
    assert count_params(model)[0] == method.expected_trainable(model) == 2 * (64 + 128 + 128)


def test_added_biases_switch_off_round_trip_and_refuse_to_merge(make_model: Any, sft_batch: dict, tmp_path: Path) -> None:
    base = logits(make_model(), sft_batch)
    method = bitfit(add_biases=True)
    model = method.tune(make_model())
    sft_step(method, model, sft_batch)
    want = logits(model, sft_batch)
    assert not torch.allclose(want, base, atol=1e-6, rtol=0)
    unchanged = dict(make_model().named_parameters())
    assert all(torch.equal(p, unchanged[n]) for n, p in model.named_parameters() if n in unchanged)  # only added tensors moved
    with method.disabled(model):
        assert torch.allclose(logits(model, sft_batch), base, atol=1e-6, rtol=0)
    assert torch.equal(logits(model, sft_batch), want)
    method.save_final(model, tmp_path / "final")
    assert (tmp_path / "final" / "tunelab_adapter.safetensors").is_file()
    assert torch.equal(logits(bitfit(add_biases=True).restore(make_model(), tmp_path / "final"), sft_batch), want)
    with pytest.raises(NotImplementedError, match="add_biases"):
        method.merged(model)


def test_train_head_true_on_a_language_model_trains_its_tied_lm_head(make_model: Any) -> None:
    method = bitfit(add_biases=True, train_head=True)
    model = method.tune(make_model())
    assert trainable(model) == llama_names(ATTN + FFN, "tunelab_bias.bias") | {"model.embed_tokens.weight"}
    assert count_params(model)[0] == method.expected_trainable(model) == 2 * 512 + 49152 * 64
    assert not method.can_disable  # the head trains in place


# ------------------------------------------------------------------------------------- Qwen2 (q/k/v biases only)


def qwen2() -> nn.Module:
    return PRESETS["tiny-qwen2"].model(dtype=torch.float32).eval()


def test_qwen2_full_trains_its_own_qkv_biases_in_place(sft_batch: dict, tmp_path: Path) -> None:
    method = bitfit()
    model = method.tune(qwen2())
    assert trainable(model) == llama_names(("q_proj", "k_proj", "v_proj"), "bias")
    assert count_params(model)[0] == method.expected_trainable(model) == 2 * (64 + 32 + 32)
    assert method.saved_format == "full" and method.mergeable and not method.can_disable
    with pytest.raises(NotImplementedError, match="in place"), method.disabled(model):
        pass
    sft_step(method, model, sft_batch)
    method.save_final(model, tmp_path / "final")
    assert (tmp_path / "final" / "model.safetensors").is_file()  # plain transformers weights
    assert torch.equal(logits(bitfit().restore(qwen2(), tmp_path / "final"), sft_batch), logits(model, sft_batch))


def test_qwen2_partial_needs_added_ffn_biases_and_keeps_its_query_bias() -> None:
    with pytest.raises(UserError, match=r"method\.add_biases.*gate_proj"):
        bitfit(variant="partial").tune(qwen2())
    method = bitfit(variant="partial", add_biases=True)
    model = method.tune(qwen2())
    want = llama_names(("q_proj",), "bias") | llama_names(("gate_proj", "up_proj"), "tunelab_bias.bias")
    assert trainable(model) == want
    assert count_params(model)[0] == method.expected_trainable(model) == 2 * (64 + 128 + 128)
    assert not method.can_disable  # q_proj.bias is a base tensor


# ------------------------------------------------------------------------------------------------- GPT-2


def test_gpt2_full_trains_every_bias_and_partial_refuses_fused_qkv() -> None:
    gpt2 = PRESETS["tiny-gpt2"].model(dtype=torch.float32)
    method = bitfit()
    model = method.tune(gpt2)
    per_block = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    assert trainable(model) == {f"transformer.h.{i}.{m}.bias" for i in (0, 1) for m in per_block} | {"transformer.ln_f.bias"}
    # per block ln_1 64 + c_attn 3*64 + c_proj 64 + ln_2 64 + c_fc 4*64 + c_proj 64 = 704; plus ln_f 64
    assert count_params(model)[0] == method.expected_trainable(model) == 2 * 704 + 64
    with pytest.raises(UserError, match=r"method\.variant.*fuses q, k and v"):
        bitfit(variant="partial", add_biases=True).tune(PRESETS["tiny-gpt2"].model(dtype=torch.float32))


# ------------------------------------------------------------------------------------- BERT classification


BERT_LAYER_BIASES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
HEAD = {"classifier.weight", "classifier.bias"}


def test_bert_full_trains_all_biases_and_the_classifier() -> None:
    method = bitfit()
    model = method.tune(tiny_bert())
    layer = {f"bert.encoder.layer.{i}.{m}.bias" for i in (0, 1) for m in BERT_LAYER_BIASES}
    assert trainable(model) == layer | {"bert.embeddings.LayerNorm.bias", "bert.pooler.dense.bias"} | HEAD
    # per layer q, k, v, attention-out 4*32 + LN 32 + intermediate 64 + output 32 + LN 32 = 288;
    # embeddings LN 32, pooler 32; classifier 2*32 + 2 = 66
    assert count_params(model)[0] == method.expected_trainable(model) == 2 * 288 + 32 + 32 + 66
    assert method.saved_format == "full" and not method.can_disable


def test_bert_partial_trains_query_intermediate_and_head_and_a_step_moves_only_those() -> None:
    method = bitfit(variant="partial")
    model = method.tune(tiny_bert())
    want = {f"bert.encoder.layer.{i}.{m}.bias" for i in (0, 1) for m in ("attention.self.query", "intermediate.dense")} | HEAD
    assert trainable(model) == want
    assert count_params(model)[0] == method.expected_trainable(model) == 2 * (32 + 64) + 66
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = build_optimizer(method.param_groups(model, 1e-2, 0.1), TrainConfig(lr=1e-2))
    ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == want


def test_bert_without_head_training() -> None:
    model = bitfit(variant="partial", train_head=False).tune(tiny_bert())
    assert not trainable(model) & HEAD and len(trainable(model)) == 4


# ----------------------------------------------------------------------------------------------- helpers


def test_out_width_of_each_layer_type() -> None:
    from transformers.pytorch_utils import Conv1D

    assert out_width(nn.Linear(5, 7, bias=False)) == 7
    assert out_width(Conv1D(11, 5)) == 11  # GPT-2's Conv1D(nf=out, nx=in), weight stored [in, out]
    assert out_width(nn.LayerNorm(13)) == 13
    assert out_width(nn.Conv2d(3, 4, 3)) == 4


def test_config_rejects_unknown_values() -> None:
    with pytest.raises(ValueError):
        bitfit(variant="query-only")
    with pytest.raises(ValueError):
        bitfit(bias_lr=1e-3)
