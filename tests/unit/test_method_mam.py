"""MAM: prefix (peft) + FFN parallel adapters. Counts by hand, both parts saved, disabled() switching both
off, and greedy generation through the hf backend equal to a plain greedy loop over the model's forward."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.generate.backends.hf import HFBackend, eos_ids
from tunelab.generate.engine import SamplingSettings
from tunelab.methods import METHODS
from tunelab.methods._base import count_params
from tunelab.methods._bottleneck import Bottleneck
from tunelab.models.presets import PRESETS


def mam(**fields: Any) -> Any:
    cls = METHODS.get("mam")
    return cls(cls.Config.model_validate({"name": "mam", **fields}))


# tiny Llama: d = 64, 2 blocks, 2 kv heads of dim 16 -> prefix width 32; adapters r = 64 // 2 = 32.
ADAPTERS = 2 * (2 * 64 * 32 + 32 + 64)  # 8384
LLAMA_PREFIX = 30 * 2 * 2 * 32  # l x blocks x (key, value) x width = 3840
# with the MLP (hidden 800): embedding 30 x 32, Linear(32, 800), Linear(800, 2 * 2 * 32)
LLAMA_PREFIX_MLP = 30 * 32 + (32 * 800 + 800) + (800 * 128 + 128)  # 129888
GPT2_PREFIX = 30 * 2 * 2 * 64  # no key/value head count: width = d = 64


@pytest.mark.parametrize(
    ("arch", "fields", "count"),
    [
        ("tiny-llama", {}, LLAMA_PREFIX + ADAPTERS),
        ("tiny-llama", {"prefix_projection": 800}, LLAMA_PREFIX_MLP + ADAPTERS),
        ("tiny-llama", {"prefix_length": 4, "bottleneck": 8}, 4 * 2 * 2 * 32 + 2 * (2 * 64 * 8 + 8 + 64)),
        ("tiny-gpt2", {}, GPT2_PREFIX + ADAPTERS),
    ],
)
def test_trainable_counts_by_hand(arch: str, fields: dict, count: int) -> None:
    m = mam(**fields)
    model = m.tune(PRESETS[arch].model(dtype=torch.float32))
    assert m.expected_trainable(model) == count
    assert count_params(model)[0] == count


def test_flags() -> None:
    m = mam(prefix_length=7)
    assert m.virtual_tokens == 7 and not m.supports_packing and m.saved_format == "tunelab"
    assert m.can_disable and not m.mergeable and not m.identity_at_init


def tuned(make_model: Callable, prefix_std: float = 1.0) -> tuple[Any, Any]:
    """A MAM model whose prefix and FFN adapters both matter (random W_up, a large prefix)."""
    m = mam(prefix_length=5)
    model = m.tune(make_model())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Bottleneck):
                module.up.weight.copy_(torch.randn(module.up.weight.shape, generator=gen) * 0.2)
        prefix = model.prompt_encoder["default"].embedding.weight
        prefix.copy_(torch.randn(prefix.shape, generator=gen) * prefix_std)
    return m, model


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


def test_disabled_switches_off_the_prefix_and_the_adapters(make_model: Callable, sft_batch: dict) -> None:
    m, model = tuned(make_model)
    model.eval()
    ids = sft_batch["input_ids"][:1, :12]
    base, full = logits(make_model(), ids), logits(model, ids)
    with model.disable_adapter():  # the prefix off: the adapters alone still change the outputs
        assert not torch.allclose(logits(model, ids), base, atol=1e-4)
    with m.disabled(model):
        assert torch.allclose(logits(model, ids), base, atol=1e-5)
    assert torch.equal(logits(model, ids), full)


def test_saved_run_holds_the_prefix_and_the_adapters(make_model: Callable, sft_batch: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    m, model = tuned(make_model)
    model.eval()
    m.save_final(model, tmp_path)
    names = set(load_file(tmp_path / "tunelab_adapter.safetensors"))
    assert any("prompt_encoder" in n for n in names)
    assert sum("tunelab_bottleneck" in n for n in names) == 2 * 4  # 2 blocks x (W_down, b_down, W_up, b_up)
    ids = sft_batch["input_ids"][:2]
    assert torch.equal(logits(m.restore(make_model(), tmp_path), ids), logits(model, ids))


def greedy_by_forward(model: Any, prompt: list[int], n: int, eos: list[int]) -> list[int]:
    """Plain greedy decoding: the whole sequence through the model's forward each step, no cache."""
    ids, new = list(prompt), []
    for _ in range(n):
        x = torch.tensor([ids])
        token = int(logits(model, x)[0, -1].argmax())
        if token in eos:
            break
        new.append(token)
        ids.append(token)
    return new


def backend_greedy(model: Any, tok: Any, rows: list[list[int]], n: int) -> dict[int, Any]:
    backend = HFBackend(model, tok)
    got: dict[int, Any] = {}
    for finished in backend.generate(rows, SamplingSettings(max_new_tokens=n), [0] * len(rows), len(rows)):
        got.update(finished)
    return got


def test_generation_equals_a_greedy_loop_over_the_forward(make_model: Callable, tok: Any) -> None:
    m, model = tuned(make_model, prefix_std=3.0)
    model.eval()
    rows = [tok.encode("def add(a, b):"), tok.encode("x"), tok.encode("Once upon a time")]  # left-padded together
    eos = eos_ids(model, tok)
    assert not HFBackend(model, tok).continuous  # virtual tokens: no cache splicing
    got = backend_greedy(model, tok, rows, 6)
    for i, prompt in enumerate(rows):
        want = greedy_by_forward(model, prompt, 6, eos)
        assert (got[i].text, got[i].n_tokens) == (tok.decode(want, skip_special_tokens=True), len(want)), f"row {i}"
    # the check has teeth: the base model decodes something else, and disabled() decodes the base model
    base = backend_greedy(make_model(), tok, rows, 6)
    assert [got[i].text for i in range(3)] != [base[i].text for i in range(3)]
    with m.disabled(model):
        off = backend_greedy(model, tok, rows, 6)
    assert [off[i].text for i in range(3)] == [base[i].text for i in range(3)]
