"""EPT (in-house): fusion, gate and reconstruction by hand, the prompt at init, the prompt the base sees,
generation through the hf backend, disabled() as the base, the learning rates and the parameter count."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tunelab.errors import UserError
from tunelab.generate import SamplingSettings
from tunelab.generate.backends.hf import HFBackend
from tunelab.methods import METHODS
from tunelab.methods._base import count_params
from tunelab.methods.ept import fuse, gate, reconstruct

PROMPTS = ["def add(a, b):", "Once upon a time, in a land far away", "x = 1"]


def ept(**fields: Any) -> Any:
    cls = METHODS.get("ept")
    return cls(cls.Config.model_validate({"name": "ept", **fields}))


def tuned(make_model: Any, **fields: Any) -> tuple[Any, Any]:
    """An EPT model moved away from its init: B, beta, the gate and W_q random, so every part matters."""
    method = ept(**fields)
    model = method.tune(make_model())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        src = model.tunelab_prompt
        src.offset_b.copy_(torch.randn(src.offset_b.shape, generator=g) * 0.3)
        src.fusion_query.add_(torch.randn(src.fusion_query.shape, generator=g) * 0.5)
        src.gate_w2.copy_(torch.randn(src.gate_w2.shape, generator=g))
        if src.fusion_beta is not None:
            src.fusion_beta.fill_(0.7)
    return method, model.eval()


def test_fusion_by_hand() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    memory = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    query = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    # row 0: q = [1, 0] -> scores [1, 0, 1] / sqrt(2); row 1: q = [0, 1] -> scores [0, 2, 1] / sqrt(2)
    want = []
    for scores in ([1.0, 0.0, 1.0], [0.0, 2.0, 1.0]):
        e = [math.exp(x / math.sqrt(2)) for x in scores]
        w = [x / sum(e) for x in e]
        want.append([w[0] + w[2], 2 * w[1] + w[2]])
    att = torch.tensor(want)
    assert torch.allclose(fuse(z, memory, query, None), att, atol=1e-6)
    assert torch.allclose(fuse(z, memory, query, torch.tensor(0.5)), z + 0.5 * att, atol=1e-6)


def test_gate_and_reconstruction_by_hand() -> None:
    f = torch.tensor([[1.0, 3.0], [3.0, -1.0]])  # mean over rows: [2, 1]
    w1, b1 = torch.tensor([[1.0, -1.0]]), torch.tensor([0.5])  # hidden: tanh(2 - 1 + 0.5)
    w2, b2 = torch.tensor([[2.0], [0.0]]), torch.tensor([0.0, 1.0])
    h = math.tanh(1.5)
    p0 = math.exp(2 * h) / (math.exp(2 * h) + math.exp(1.0))
    g = gate(f, w1, b1, w2, b2)
    assert torch.allclose(g, torch.tensor([p0, 1 - p0]), atol=1e-6)
    proj = torch.stack([torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])])  # identity and a swap
    want = p0 * f + (1 - p0) * f[:, [1, 0]]
    assert torch.allclose(reconstruct(f, proj, g), want, atol=1e-6)


def test_prompt_starts_at_the_short_prompt_and_the_subspaces_differ(make_model: Any) -> None:
    model = ept().tune(make_model())
    src = model.tunelab_prompt
    with torch.no_grad():
        assert torch.allclose(src.prompt(), src.prompt_vectors, atol=1e-6, rtol=0)
    w = src.projections.detach()
    assert not torch.equal(w[0], w[1])
    assert torch.allclose(w.mean(dim=0), torch.eye(64), atol=1e-6)
    # the design note's plain attention (no residual) starts far from P_s: the reason for the residual default
    plain = ept(fusion_residual=False).tune(make_model()).tunelab_prompt
    with torch.no_grad():
        assert not torch.allclose(plain.prompt(), plain.prompt_vectors, atol=1e-3)


def test_prompt_formula_end_to_end(make_model: Any) -> None:
    _, model = tuned(make_model, prompt_length=4, offset_positions=6, r=2, subspaces=3)
    s = model.tunelab_prompt
    c = 8.0 / math.sqrt(2)
    with torch.no_grad():
        ab = torch.stack([sum(s.offset_a[t, k] * s.offset_b[k] for k in range(2)) for t in range(6)])
        z = s.prompt_vectors + c * ab[:4]
        keys = torch.cat([z, c * ab])
        rows = []
        for i in range(4):  # one softmax row at a time
            w = torch.softmax(torch.stack([(z[i] @ s.fusion_query) @ k for k in keys]) / 8.0, dim=0)
            rows.append(z[i] + s.fusion_beta * sum(w[j] * keys[j] for j in range(10)))
        f = torch.stack(rows)
        logits = s.gate_w2 @ torch.tanh(s.gate_w1 @ f.mean(0) + s.gate_b1) + s.gate_b2
        g = torch.exp(logits) / torch.exp(logits).sum()
        want = sum(g[j] * (f @ s.projections[j]) for j in range(3))
        assert torch.allclose(s.prompt(), want, atol=1e-5, rtol=0)


def test_the_base_sees_the_fused_prompt(make_model: Any) -> None:
    _, model = tuned(make_model)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        out = model(input_ids=ids).logits
        src = model.tunelab_prompt
        embeds = model.get_input_embeddings()(ids[0]) + src.offset(torch.arange(5))
        direct = model.base(inputs_embeds=torch.cat([src.prompt(), embeds])[None]).logits
    assert out.shape == (1, 5 + 20, direct.shape[-1])
    assert torch.allclose(out, direct, atol=1e-5, rtol=0)


def backend_completions(model: Any, tok: Any, rows: list[list[int]], settings: SamplingSettings, batch_size: int) -> list[Any]:
    backend = HFBackend(model, tok)
    assert not backend.continuous
    done = {i: c for batch in backend.generate(rows, settings, [0] * len(rows), batch_size) for i, c in batch}
    return [done[i] for i in range(len(rows))]


def test_generation_through_the_backend_equals_a_greedy_forward_loop(make_model: Any, tok: Any) -> None:
    _, model = tuned(make_model)
    rows = [tok.encode(p) for p in PROMPTS]
    settings = SamplingSettings(max_new_tokens=6)
    batched = backend_completions(model, tok, rows, settings, batch_size=3)
    alone = backend_completions(model, tok, rows, settings, batch_size=1)
    eos = HFBackend(model, tok).eos
    for i, row in enumerate(rows):
        toks = list(row)
        for _ in range(6):  # greedy, no cache: the whole sequence through the wrapper's forward
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([toks])).logits[0, -1].argmax())
            if nxt in eos:
                break
            toks.append(nxt)
        assert batched[i].text == tok.decode(toks[len(row) :], skip_special_tokens=True), f"row {i}"
        assert (alone[i].text, alone[i].n_tokens) == (batched[i].text, batched[i].n_tokens) == (batched[i].text, len(toks) - len(row))


def test_disabled_gives_the_base_model(make_model: Any, sft_batch: dict) -> None:
    method, model = tuned(make_model)
    inputs = {k: sft_batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        with method.disabled(model):
            off = model(**inputs).logits
        assert torch.equal(off, make_model()(**inputs).logits)


def test_learning_rates(make_model: Any) -> None:
    method, model = tuned(make_model, prompt_lr=0.1, offset_lr=1e-3, fusion_lr=5e-4)
    groups = method.param_groups(model, 2e-4, 0.01)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.1, 0.0), (1e-3, 0.01), (5e-4, 0.0)]
    src = model.tunelab_prompt
    assert groups[0]["params"] == [src.prompt_vectors] and groups[1]["params"] == [src.offset_a, src.offset_b]
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    default_method, default_model = tuned(make_model)
    assert default_method.param_groups(default_model, 2e-4, 0.0)[2]["lr"] == 2e-4


@pytest.mark.parametrize(("fields", "count"), [
    # m*d + s*r + r*d + d^2 + beta + N*d^2 + (h*d + h + N*h + N), d = 64
    ({}, 1280 + 7680 + 1920 + 4096 + 1 + 4 * 4096 + (4096 + 64 + 256 + 4)),
    ({"prompt_length": 4, "offset_positions": 8, "r": 2, "subspaces": 2, "gate_hidden": 3, "fusion_residual": False},
     256 + 16 + 128 + 4096 + 0 + 2 * 4096 + (192 + 3 + 6 + 2)),
])
def test_parameter_count_by_hand(make_model: Any, fields: dict, count: int) -> None:
    method = ept(**fields)
    model = method.tune(make_model())
    assert method.expected_trainable(model) == count == count_params(model)[0]


def test_fewer_offset_positions_than_prompt_vectors_is_a_user_error(make_model: Any) -> None:
    with pytest.raises(UserError, match="method.offset_positions"):
        ept(prompt_length=10, offset_positions=5).tune(make_model())
