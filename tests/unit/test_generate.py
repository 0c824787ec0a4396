"""Generation engine on the tiny-llama preset: batching/padding parity, stops, sampling seeds, PEFT models."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tunelab.config import ModelConfig
from tunelab.errors import UserError
from tunelab.generate import Engine, SamplingSettings, cut_at_stop
from tunelab.generate.backends.hf import HFBackend
from tunelab.models import load_model

PROMPTS = [
    "def add(a, b):",
    [{"role": "user", "content": "Write a function that reverses a string."}],
    "x",
    "Once upon a time, in a land far away, there lived",
    [{"role": "user", "content": "hi"}],
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    # a hidden-64 model gains nothing from threads, and on a busy 2-core CI box OpenMP barriers make it 10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    return load_model(ModelConfig(name="tiny-llama"))


def test_left_padded_batch_equals_unbatched_greedy(tiny) -> None:
    model, tok = tiny
    settings = SamplingSettings(max_new_tokens=16)
    batched = Engine(model, tok, batch_size=8)
    backend = batched.backend
    assert isinstance(backend, HFBackend)
    got = batched.generate(PROMPTS, settings)
    for i, prompt in enumerate(PROMPTS):
        ids = batched.encode(prompt)
        # unbatched reference: one row, no padding at all, plain transformers greedy decoding
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        ref_new = ref[0, len(ids):].tolist()
        eos = [k for k, t in enumerate(ref_new) if t == tok.eos_token_id]
        ref_new = ref_new[: eos[0]] if eos else ref_new
        assert got[i][0].text == tok.decode(ref_new, skip_special_tokens=True), f"prompt {i}"
        assert got[i][0].n_tokens == len(ref_new)


def test_chat_prompts_use_the_template_and_raw_prompts_do_not(tiny) -> None:
    model, tok = tiny
    engine = Engine(model, tok)
    chat = engine.render([{"role": "user", "content": "hello"}])
    assert chat.startswith("<|im_start|>") and chat.endswith("<|im_start|>assistant\n")
    assert engine.render("plain text") == "plain text"


def test_stop_strings_cut_and_stop_each_row(tiny) -> None:
    model, tok = tiny
    engine = Engine(model, tok, batch_size=8)
    free = engine.generate(PROMPTS, SamplingSettings(max_new_tokens=24))
    # pick, per prompt, a piece of its own free-running output as the stop string
    stops = tuple(sorted({c[0].text[6:9] for c in free if len(c[0].text) >= 9}))
    assert stops
    stopped = engine.generate(PROMPTS, SamplingSettings(max_new_tokens=24, stop=stops))
    for f, s in zip(free, stopped, strict=True):
        expected, hit = cut_at_stop(f[0].text, stops)
        assert s[0].text == expected
        if hit:
            assert s[0].finish_reason == "stop"
            assert s[0].n_tokens < 24 and not any(x in s[0].text for x in stops)


def test_cut_at_stop_picks_the_earliest() -> None:
    assert cut_at_stop("a b [DONE] c\nd", ["\n", "[DONE]"]) == ("a b ", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_sampling_is_reproducible_and_n_samples_differ(tiny) -> None:
    model, tok = tiny
    engine = Engine(model, tok, batch_size=4)
    s = SamplingSettings(max_new_tokens=12, temperature=1.0, top_p=0.95, n=3, seed=7)
    before = torch.random.get_rng_state()
    a, b = engine.generate(PROMPTS[:2], s), engine.generate(PROMPTS[:2], s)
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG is untouched
    assert [[c.text for c in row] for row in a] == [[c.text for c in row] for row in b]
    assert all(len(row) == 3 for row in a)
    assert len({c.text for c in a[0]}) > 1  # three draws from a random model are not all equal
    other = engine.generate(PROMPTS[:2], SamplingSettings(max_new_tokens=12, temperature=1.0, n=3, seed=8))
    assert [c.text for c in other[0]] != [c.text for c in a[0]]


def test_peft_model_and_merged_model_generate(tiny) -> None:
    from peft import LoraConfig, get_peft_model

    model, tok = load_model(ModelConfig(name="tiny-llama"))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.train()
    settings = SamplingSettings(max_new_tokens=10)
    adapted = Engine(peft_model, tok).generate(PROMPTS[:3], settings)
    assert peft_model.training  # the caller's mode is restored
    with peft_model.disable_adapter():
        plain = Engine(peft_model, tok).generate(PROMPTS[:3], settings)
    base_out = Engine(tiny[0], tok).generate(PROMPTS[:3], settings)
    assert [r[0].text for r in plain] == [r[0].text for r in base_out]
    assert [r[0].text for r in adapted] != [r[0].text for r in plain]  # the (non-zero) adapter is active
    merged = peft_model.merge_and_unload()
    assert [r[0].text for r in Engine(merged, tok).generate(PROMPTS[:3], settings)] == [r[0].text for r in adapted]


def test_bad_settings_are_user_errors(tiny) -> None:
    with pytest.raises(UserError):
        SamplingSettings(max_new_tokens=0)
    with pytest.raises(UserError):
        SamplingSettings(top_p=0)
    with pytest.raises(UserError, match="unknown"):
        Engine(tiny[0], tiny[1], backend="nope")  # type: ignore[arg-type]


def test_continuous_batching_matches_static_batches_and_single_rows(tiny) -> None:
    model, tok = tiny
    prompts = PROMPTS * 2  # 10 rows through 3 slots: rows join and leave a live batch many times
    settings = SamplingSettings(max_new_tokens=20, stop=("e t",))
    cont = Engine(model, tok, batch_size=3)
    assert isinstance(cont.backend, HFBackend) and cont.backend.continuous
    static = Engine(model, tok, batch_size=3)
    static.backend.continuous = False  # type: ignore[attr-defined]
    single = Engine(model, tok, batch_size=1)
    got, ref, one = (e.generate(prompts, settings) for e in (cont, static, single))
    for a, b, c in zip(got, ref, one, strict=True):
        assert (a[0].text, a[0].n_tokens, a[0].finish_reason) == (b[0].text, b[0].n_tokens, b[0].finish_reason)
        assert a[0].text == c[0].text
    assert {c[0].finish_reason for c in got} <= {"eos", "stop", "length"}
    assert any(c[0].finish_reason == "length" and c[0].n_tokens == 20 for c in got)


def test_a_sampled_row_does_not_depend_on_its_batch(tiny) -> None:
    model, tok = tiny
    s = SamplingSettings(max_new_tokens=10, temperature=0.8, top_p=0.9, n=2, seed=3)
    wide = Engine(model, tok, batch_size=8).generate(PROMPTS, s)
    narrow = Engine(model, tok, batch_size=1).generate(PROMPTS, s)
    assert [[c.text for c in row] for row in wide] == [[c.text for c in row] for row in narrow]


def test_sample_next_greedy_and_nucleus_by_hand() -> None:
    from tunelab.generate.backends.hf import sample_next

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert sample_next(logits, 0.0, 1.0, None).tolist() == [0]
    # top_p 0.75: 0.5 alone is short of 0.75, 0.5 + 0.3 reaches it -> only tokens 0 and 1 can come out
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.75, [gen])[0]) for _ in range(300)}
    assert draws == {0, 1}
    # top_p 0.5: the top token alone already holds 0.5
    assert {int(sample_next(logits, 1.0, 0.5, [gen])[0]) for _ in range(50)} == {0}
    # temperature 1, no nucleus: all four appear, with frequencies near their probabilities
    counts = torch.bincount(torch.cat([sample_next(logits, 1.0, 1.0, [gen]) for _ in range(4000)]), minlength=4)
    assert torch.allclose(counts / 4000, probs[0], atol=0.03)
    # a low temperature sharpens: p0 ∝ 0.5^(1/0.25) dominates
    sharp = torch.cat([sample_next(logits, 0.25, 1.0, [gen]) for _ in range(400)])
    assert (sharp == 0).float().mean() > 0.85


def test_prompt_learning_models_fall_back_to_static_generate(tiny) -> None:
    from peft import PromptTuningConfig, get_peft_model

    model, tok = load_model(ModelConfig(name="tiny-llama"))
    pt = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    engine = Engine(pt, tok, batch_size=2)
    assert not engine.backend.continuous  # type: ignore[attr-defined]
    out = engine.generate(PROMPTS[:3], SamplingSettings(max_new_tokens=6))
    assert all(len(row) == 1 and row[0].n_tokens <= 6 for row in out)
