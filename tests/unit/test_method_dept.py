"""DePT (in-house soft prompt): the offset by hand, the prompt the base sees, generation through the hf backend,
disabled() as the base, the two learning rates and the parameter count (tiny Llama, d = 64)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tunelab.errors import UserError
from tunelab.generate import SamplingSettings
from tunelab.generate.backends.hf import HFBackend
from tunelab.methods import METHODS
from tunelab.methods._base import count_params, virtual_tokens
from tunelab.methods._softprompt import dept_offset

PROMPTS = ["def add(a, b):", "Once upon a time, in a land far away", "x = 1"]


def dept(**fields: Any) -> Any:
    cls = METHODS.get("dept")
    return cls(cls.Config.model_validate({"name": "dept", **fields}))


def tuned(make_model: Any, **fields: Any) -> tuple[Any, Any]:
    """A DePT model whose offset is far from zero (B random), so every check below sees it."""
    method = dept(**fields)
    model = method.tune(make_model())
    with torch.no_grad():
        src = model.tunelab_prompt
        src.offset_b.copy_(torch.randn(src.offset_b.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return method, model.eval()


def test_offset_by_hand() -> None:
    a = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]])  # s = 3, r = 2
    b = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])  # d = 3
    got = dept_offset(a, b, 0.5, torch.tensor([[0, 1, 2, 3, 7]]))
    # row t of A B: [a_t0, a_t1, 2 a_t0 - a_t1], times c = 0.5; nothing at t >= s = 3
    want = torch.tensor([[[0.5, 1.0, 0.0], [0.25, -0.5, 1.0], [1.5, 0.0, 3.0], [0, 0, 0], [0, 0, 0]]])
    assert torch.equal(got, want)


def test_the_base_sees_the_prompt_then_offset_embeddings(make_model: Any) -> None:
    method, model = tuned(make_model, offset_positions=5, prompt_length=3)
    src, m = model.tunelab_prompt, 3
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    seen: dict[str, torch.Tensor] = {}
    hook = model.base.register_forward_pre_hook(lambda mod, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    hook.remove()
    emb = model.get_input_embeddings().weight
    c = 8.0 / math.sqrt(30)
    rows = [src.prompt_vectors[i] for i in range(m)]
    for t in range(8):  # E(x_t) + c * sum_k A[t, k] B[k] below s = 5, E(x_t) alone beyond
        off = sum(c * src.offset_a[t, k] * src.offset_b[k] for k in range(30)) if t < 5 else 0.0
        rows.append(emb[ids[0, t]] + off)
    want = torch.stack(rows)[None].detach()
    assert torch.allclose(seen["inputs_embeds"], want, atol=1e-6, rtol=0)
    assert not torch.allclose(want[0, m:], emb[ids[0]].detach(), atol=1e-3)  # the offset is really there
    assert out.shape == (1, 8 + m, emb.shape[0])
    with torch.no_grad():
        direct = model.base(inputs_embeds=want, attention_mask=torch.ones(1, 8 + m, dtype=torch.long)).logits
    assert torch.allclose(out, direct, atol=1e-5, rtol=0)


def test_padded_rows_equal_the_row_alone(make_model: Any) -> None:
    """Positions count real tokens: right padding (training) and left padding give the row's own offsets."""
    _, model = tuned(make_model)
    ids = torch.tensor([[5, 6, 7, 8, 9], [21, 22, 23, 2, 2], [2, 2, 21, 22, 23]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:2, :3]).logits[0]
    assert torch.allclose(batched[1, : 20 + 3], alone, atol=1e-5, rtol=0)
    assert torch.allclose(batched[2, -3:], alone[-3:], atol=1e-5, rtol=0)


def test_packed_rows_are_refused(make_model: Any) -> None:
    _, model = tuned(make_model)
    with pytest.raises(NotImplementedError, match="packed"):
        model(input_ids=torch.tensor([[5, 6, 7, 8]]), position_ids=torch.tensor([[0, 1, 0, 1]]))


def greedy_by_forward(model: Any, row: list[int], n: int, eos: list[int], offset_new: bool = True) -> list[int]:
    """Greedy decoding with no cache: the whole sequence through the wrapper's forward every step (or, with
    offset_new False, through the base with the offset only on the prompt's tokens: what generation must NOT do)."""
    toks = list(row)
    for _ in range(n):
        ids = torch.tensor([toks])
        with torch.no_grad():
            if offset_new:
                logits = model(input_ids=ids).logits
            else:
                src = model.tunelab_prompt
                off = src.offset(torch.arange(len(toks)))
                off[len(row) :] = 0
                embeds = torch.cat([src.prompt(), model.get_input_embeddings()(ids[0]) + off])[None]
                logits = model.base(inputs_embeds=embeds).logits
        nxt = int(logits[0, -1].argmax())
        if nxt in eos:
            break
        toks.append(nxt)
    return toks[len(row) :]


def backend_texts(model: Any, tok: Any, rows: list[list[int]], settings: SamplingSettings, batch_size: int) -> list[Any]:
    backend = HFBackend(model, tok)
    assert not backend.continuous  # a soft prompt lives outside the cache the continuous path splices
    done = {i: c for batch in backend.generate(rows, settings, [0] * len(rows), batch_size) for i, c in batch}
    return [done[i] for i in range(len(rows))]


def test_generation_through_the_backend_equals_a_greedy_forward_loop(make_model: Any, tok: Any) -> None:
    _, model = tuned(make_model)
    rows = [tok.encode(p) for p in PROMPTS]
    assert len({len(r) for r in rows}) == len(rows)  # the batch is really left-padded
    settings = SamplingSettings(max_new_tokens=6)
    batched = backend_texts(model, tok, rows, settings, batch_size=3)
    alone = backend_texts(model, tok, rows, settings, batch_size=1)
    eos = HFBackend(model, tok).eos
    for i, row in enumerate(rows):
        want = greedy_by_forward(model, row, 6, eos)
        assert batched[i].text == tok.decode(want, skip_special_tokens=True), f"row {i}"
        assert batched[i].n_tokens == len(want)
        assert (alone[i].text, alone[i].n_tokens) == (batched[i].text, batched[i].n_tokens)
    # generated tokens must get their offset too: leaving it out changes the greedy tokens
    assert any(greedy_by_forward(model, r, 6, eos, offset_new=False) != greedy_by_forward(model, r, 6, eos) for r in rows)


def test_stop_strings_see_the_generated_text(make_model: Any, tok: Any) -> None:
    _, model = tuned(make_model)
    rows = [tok.encode(p) for p in PROMPTS]
    free = backend_texts(model, tok, rows, SamplingSettings(max_new_tokens=12), batch_size=3)
    stop = next(c.text[4:7] for c in free if len(c.text) >= 8 and c.text[4:7].strip())
    stopped = backend_texts(model, tok, rows, SamplingSettings(max_new_tokens=12, stop=(stop,)), batch_size=3)
    hits = [s for f, s in zip(free, stopped, strict=True) if stop in f.text]
    assert hits and all(s.finish_reason == "stop" and s.n_tokens < 12 and stop not in s.text for s in hits)
    for f, s in zip(free, stopped, strict=True):
        assert f.text.startswith(s.text)


def test_disabled_gives_the_base_model(make_model: Any, tok: Any, sft_batch: dict) -> None:
    method, model = tuned(make_model)
    base = make_model()
    inputs = {k: sft_batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), method.disabled(model):
        off = model(**inputs).logits
    with torch.no_grad():
        assert torch.equal(off, base(**inputs).logits)
        assert model(**inputs).logits.shape[1] == off.shape[1] + 20  # switched back on
    rows = [tok.encode(p) for p in PROMPTS]
    settings = SamplingSettings(max_new_tokens=6)
    with method.disabled(model):
        got = backend_texts(model, tok, rows, settings, batch_size=3)
    plain = HFBackend(base, tok, continuous=False)
    want = {i: c for batch in plain.generate(rows, settings, [0] * 3, 3) for i, c in batch}
    assert [c.text for c in got] == [want[i].text for i in range(3)]


def test_two_learning_rates(make_model: Any) -> None:
    method, model = tuned(make_model, prompt_lr=0.1, offset_lr=1e-3)
    src = model.tunelab_prompt
    groups = method.param_groups(model, 2e-4, 0.01)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.1, 0.0), (1e-3, 0.01)]
    assert groups[0]["params"] == [src.prompt_vectors] and groups[1]["params"] == [src.offset_a, src.offset_b]
    default_method, default_model = tuned(make_model)
    emb = default_model.get_input_embeddings().weight.detach()
    rms = float(emb.double().pow(2).mean().sqrt())
    lrs = [g["lr"] for g in default_method.param_groups(default_model, 2e-4, 0.0)]
    assert lrs[0] == pytest.approx(0.3 * rms, rel=1e-5) and lrs[1] == 2e-4
    assert 1e-3 < lrs[0] < 1e-2  # the tiny model's embeddings are initialised at std 0.02


@pytest.mark.parametrize(("fields", "count"), [({}, 20 * 64 + 256 * 30 + 30 * 64), ({"prompt_length": 4, "offset_positions": 16, "r": 2}, 416)])
def test_parameter_count_by_hand(make_model: Any, fields: dict, count: int) -> None:
    method = dept(**fields)
    model = method.tune(make_model())
    assert method.expected_trainable(model) == count == count_params(model)[0]
    assert virtual_tokens(model) == fields.get("prompt_length", 20)


def test_init_is_seeded_and_leaves_the_global_rng(make_model: Any) -> None:
    before = torch.random.get_rng_state()
    a, b = dept().tune(make_model()), dept().tune(make_model())
    c = dept(init_seed=1).tune(make_model())
    assert torch.equal(before, torch.random.get_rng_state())
    assert torch.equal(a.tunelab_prompt.prompt_vectors, b.tunelab_prompt.prompt_vectors)
    assert not torch.equal(a.tunelab_prompt.prompt_vectors, c.tunelab_prompt.prompt_vectors)
    emb = a.get_input_embeddings().weight  # vocab init: every prompt vector is some token's embedding
    assert all(bool((emb == v).all(dim=1).any()) for v in a.tunelab_prompt.prompt_vectors)
    assert not a.tunelab_prompt.offset_b.detach().any()


def test_a_prompt_longer_than_the_vocabulary_is_a_user_error(make_model: Any) -> None:
    with pytest.raises(UserError, match="method.prompt_length"):
        dept(prompt_length=60000).tune(make_model())
