"""Per-sample attention for packed rows (models/attention.py) against transformers' own attention, per arch."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tunelab.config import ModelConfig
from tunelab.models import load_model
from tunelab.models.attention import (
    NAME,
    STATS,
    _is_packed_remap,
    default_attention,
    enable_packed_attention,
    segment_bounds,
)

ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-gpt2"]
LENGTHS = [10, 25, 5]  # three samples in one row


def _model(name: str) -> Any:
    torch.manual_seed(0)
    model, _ = load_model(ModelConfig(name=name), "cpu")
    return model.eval()


def _packed_row() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (2, sum(LENGTHS)), generator=gen)
    pos = torch.tensor([[p for n in LENGTHS for p in range(n)], list(range(sum(LENGTHS)))])
    return ids, pos


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rows_equal_each_sample_alone_and_the_default(arch: str) -> None:
    model = _model(arch)
    ids, pos = _packed_row()
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # transformers' block mask
        assert enable_packed_attention(model)
        assert model.config._attn_implementation == NAME
        calls = STATS["packed_calls"]
        got = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        # the per-segment path ran (once per layer), rather than transformers' dense mask passed through
        assert STATS["packed_calls"] - calls == model.config.num_hidden_layers
        alone = [model(input_ids=ids[:1, s:e], use_cache=False).logits[0] for s, e in [(0, 10), (10, 35), (35, 40)]]
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got[0], torch.cat(alone), atol=1e-5)  # no sample sees another


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batches_and_gradients_are_unchanged(arch: str) -> None:
    model = _model(arch)
    ids, pos = _packed_row()
    mask = torch.ones_like(ids)
    mask[0, 30:] = 0

    def grads(**inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(**inputs, use_cache=False).logits
        out.float().logsumexp(-1).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want_pad, _ = grads(input_ids=ids, attention_mask=mask)
    want_packed, want_g = grads(input_ids=ids, position_ids=pos)
    assert enable_packed_attention(model)
    got_pad, _ = grads(input_ids=ids, attention_mask=mask)
    got_packed, got_g = grads(input_ids=ids, position_ids=pos)
    assert torch.equal(got_pad, want_pad)  # a padding mask takes transformers' own path, unchanged
    assert torch.allclose(got_packed, want_packed, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(got_g, want_g, strict=True))


def test_generation_with_a_cache_is_unchanged() -> None:
    model = _model("tiny-llama")
    ids = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(2))
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    enable_packed_attention(model)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)


def test_default_attention_restores_sdpa_for_saving() -> None:
    model = _model("tiny-llama")
    enable_packed_attention(model)
    default_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_a_sliding_window_or_a_chosen_implementation_keeps_its_attention() -> None:
    model = _model("tiny-llama")
    model.config.sliding_window = 16  # per-segment causal attention has no window
    assert not enable_packed_attention(model) and model.config._attn_implementation == "sdpa"
    model = _model("tiny-llama")
    model.set_attn_implementation("eager")
    assert not enable_packed_attention(model) and model.config._attn_implementation == "eager"


def test_only_the_plain_packed_causal_mask_is_skipped() -> None:
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        packed_sequence_mask_function,
        remap_positions_for_packed_sequence,
        sliding_window_causal_mask_function,
    )

    pos = torch.zeros(1, 4, dtype=torch.long)
    same = packed_sequence_mask_function(pos)
    assert _is_packed_remap(and_masks(remap_positions_for_packed_sequence(causal_mask_function, pos), same))
    assert _is_packed_remap(remap_positions_for_packed_sequence(causal_mask_function, pos))
    assert not _is_packed_remap(causal_mask_function)
    window = sliding_window_causal_mask_function(8)
    assert not _is_packed_remap(and_masks(remap_positions_for_packed_sequence(window, pos), same))


def test_a_model_whose_mask_is_not_recognised_keeps_its_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    import tunelab.models.attention as att

    monkeypatch.setattr(att, "_is_packed_remap", lambda fn: False)  # as if transformers built the mask another way
    model = _model("tiny-llama")
    assert not enable_packed_attention(model) and model.config._attn_implementation == "sdpa"


def test_segment_bounds() -> None:
    assert segment_bounds(torch.tensor([0, 1, 2, 0, 1, 0])) == [0, 3, 5, 6]
    assert segment_bounds(torch.tensor([0, 1, 2, 3])) == [0, 4]
