"""SFT loss maths against hand-computed values, label smoothing, and the label_logits fast path."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tunelab.data.templating import IGNORE
from tunelab.objectives import OBJECTIVES
from tunelab.objectives._logprobs import _plain_lm, label_logits, token_logprobs
from tunelab.objectives.sft import SFTConfig, sft_loss

# two labelled positions, vocabulary of three
LOGITS = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
LABELS = torch.tensor([2, 0])


def _log_softmax(row: list[float]) -> list[float]:
    z = math.log(sum(math.exp(x) for x in row))
    return [x - z for x in row]


LP0 = _log_softmax([1.0, 2.0, 3.0])  # [-2.4076, -1.4076, -0.4076]
LP1 = _log_softmax([0.0, 0.0, 0.0])  # [-log 3] * 3


def test_hand_computed_mean_over_step_tokens() -> None:
    expected = -(LP0[2] + LP1[0]) / 2
    assert expected == pytest.approx((0.40760596 + math.log(3)) / 2, abs=1e-7)
    assert sft_loss(LOGITS, LABELS, num_items=2).item() == pytest.approx(expected, abs=1e-6)


def test_normalised_by_num_items_not_by_local_count() -> None:
    # the same two tokens as part of an 8-token optimizer step contribute a quarter as much
    assert sft_loss(LOGITS, LABELS, num_items=8).item() == pytest.approx(-(LP0[2] + LP1[0]) / 8, abs=1e-6)
    assert sft_loss(LOGITS, LABELS, num_items=0).item() == pytest.approx(-(LP0[2] + LP1[0]), abs=1e-6)


def test_label_smoothing_hand_computed() -> None:
    eps, v = 0.1, 3
    # (1 - eps) * NLL + eps * mean over the vocabulary of -log p
    per_token = [(1 - eps) * -lp[y] + eps * -sum(lp) / v for lp, y in ((LP0, 2), (LP1, 0))]
    got = sft_loss(LOGITS, LABELS, num_items=2, label_smoothing=eps).item()
    assert got == pytest.approx(sum(per_token) / 2, abs=1e-6)
    # peaked logits: smoothing raises the loss; uniform logits: it changes nothing
    assert got > sft_loss(LOGITS, LABELS, num_items=2).item()
    flat = torch.zeros(2, 3)
    assert sft_loss(flat, LABELS, 2, label_smoothing=eps).item() == pytest.approx(math.log(3), abs=1e-6)


def test_token_logprobs_and_fp32() -> None:
    lp = token_logprobs(LOGITS.to(torch.bfloat16), LABELS)
    assert lp.dtype == torch.float32
    assert lp.tolist() == pytest.approx([LP0[2], LP1[0]], abs=2e-2)


def test_gradient_is_softmax_minus_onehot_over_n() -> None:
    logits = LOGITS.clone().requires_grad_(True)
    sft_loss(logits, LABELS, num_items=2).backward()
    p0 = [math.exp(x) for x in LP0]
    expected = torch.tensor([[p0[0], p0[1], p0[2] - 1], [1 / 3 - 1, 1 / 3, 1 / 3]]) / 2
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_sft_objective_matches_full_logits_reference(model: Any, sft_batch: dict[str, torch.Tensor]) -> None:
    """The fast path (head only on labelled positions) equals cross-entropy over the model's full logits."""
    obj = OBJECTIVES.get("sft")(SFTConfig())
    n = obj.num_items(sft_batch)
    assert n == int((sft_batch["labels"] != IGNORE).sum()) > 0
    loss, metrics = obj.loss(model, sft_batch, n)
    with torch.no_grad():
        logits = model(input_ids=sft_batch["input_ids"], attention_mask=sft_batch["attention_mask"], use_cache=False).logits
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), sft_batch["labels"].flatten(), ignore_index=IGNORE)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    assert metrics["tokens"] == n


def test_sft_matches_transformers_own_loss(model: Any, sft_batch: dict[str, torch.Tensor]) -> None:
    """Reference numerics: transformers' ForCausalLM loss shifts labels itself, so give it unshifted labels."""
    obj = OBJECTIVES.get("sft")(SFTConfig())
    loss, _ = obj.loss(model, sft_batch, obj.num_items(sft_batch))
    unshifted = torch.cat([torch.full_like(sft_batch["labels"][:, :1], IGNORE), sft_batch["labels"][:, :-1]], dim=1)
    with torch.no_grad():
        out = model(input_ids=sft_batch["input_ids"], attention_mask=sft_batch["attention_mask"], labels=unshifted)
    assert loss.item() == pytest.approx(out.loss.item(), abs=1e-5)


def test_label_logits_fast_path_is_used_for_plain_and_lora_models(model: Any) -> None:
    assert _plain_lm(model) is model
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert _plain_lm(peft_model) is peft_model.get_base_model()


def test_label_logits_shapes(model: Any, packed_batch: dict[str, torch.Tensor]) -> None:
    logits, labels = label_logits(model, packed_batch)
    n = int((packed_batch["labels"] != IGNORE).sum())
    assert logits.shape == (n, model.config.vocab_size) and labels.shape == (n,)


def test_sft_objective_with_label_smoothing_and_one_token_steps(model: Any, sft_batch: dict[str, torch.Tensor]) -> None:
    """label_smoothing reaches the loss (through the full-logits path); a step of one label token is not halved."""
    sel = sft_batch["labels"] != IGNORE
    with torch.no_grad():
        logits = model(input_ids=sft_batch["input_ids"], attention_mask=sft_batch["attention_mask"], use_cache=False).logits[sel]
    labels = sft_batch["labels"][sel]
    n = int(sel.sum())
    for eps in (0.0, 0.2):
        obj = OBJECTIVES.get("sft")(SFTConfig(label_smoothing=eps))
        with torch.no_grad():
            loss, metrics = obj.loss(model, sft_batch, n)
        # by hand: (1 - eps) * NLL + eps * mean over the vocabulary of -log p
        lp = torch.log_softmax(logits.double(), -1)
        want = ((1 - eps) * -lp.gather(1, labels[:, None]).squeeze(1) + eps * -lp.mean(-1)).sum() / n
        assert loss.item() == pytest.approx(want.item(), abs=1e-5)
        assert metrics == {"tokens": float(n)}
    one = {**sft_batch, "labels": torch.full_like(sft_batch["labels"], IGNORE)}
    row, col = sel.nonzero()[0].tolist()
    one["labels"][row, col] = sft_batch["labels"][row, col]
    for eps in (0.0, 0.2):
        obj = OBJECTIVES.get("sft")(SFTConfig(label_smoothing=eps))
        assert obj.num_items(one) == 1
        with torch.no_grad():
            loss, metrics = obj.loss(model, one, 1)
        lp = torch.log_softmax(logits[0].double(), -1)
        want = (1 - eps) * -lp[labels[0]] + eps * -lp.mean()
        assert loss.item() == pytest.approx(want.item(), abs=1e-5) and metrics == {"tokens": 1.0}
