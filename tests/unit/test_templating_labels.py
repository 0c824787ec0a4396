"""Chat templating and loss masks: labelled tokens are exactly each assistant turn's content + <|im_end|>."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tunelab.data.formats import detect_format, to_example
from tunelab.data.templating import IGNORE, Encoded, encode

IM_END = "<|im_end|>"


def labelled_spans(tok: Any, enc: Encoded) -> list[str]:
    """Decode each maximal run of labelled tokens."""
    assert len(enc.input_ids) == len(enc.labels)
    spans, cur = [], []
    for tid, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab == IGNORE:
            if cur:
                spans.append(cur)
            cur = []
        else:
            assert lab == tid  # labels are unshifted copies of the ids
            cur.append(lab)
    if cur:
        spans.append(cur)
    return [tok.decode(s) for s in spans]


def enc_row(tok: Any, row: dict, fmt: str | None = None, **kw: Any) -> Encoded:
    fmt = fmt or detect_format(row, "row")
    kw.setdefault("template", "chat")
    kw.setdefault("loss_on", "assistant")
    system = kw.pop("system_prompt", None)
    return encode(tok, to_example(row, fmt, "row", system), **kw)


SYSTEM = "You answer in Python only."
MULTI = {"messages": [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Add two numbers."},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    {"role": "user", "content": "Now subtract."},
    {"role": "assistant", "content": "def sub(a, b):\n    return a - b"},
]}

CASES = {
    "messages": ({"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there"}]},
                 ["hi there"], ["Say hi."]),
    "messages_multi": (MULTI, ["def add(a, b):\n    return a + b", "def sub(a, b):\n    return a - b"],
                       [SYSTEM, "Add two numbers.", "Now subtract."]),
    "sharegpt": ({"conversations": [
        {"from": "system", "value": "Be terse."}, {"from": "human", "value": "Square 3?"}, {"from": "gpt", "value": "9"},
    ]}, ["9"], ["Be terse.", "Square 3?"]),
    "prompt_completion": ({"prompt": "Reverse 'abc'.", "completion": "'cba'"}, ["'cba'"], ["Reverse 'abc'."]),
    "alpaca": ({"instruction": "Double x.", "input": "", "output": "x * 2"}, ["x * 2"], ["Double x."]),
    "alpaca_input": ({"instruction": "Double x.", "input": "x = 21", "output": "42"}, ["42"], ["Double x.", "x = 21"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_labels_are_exactly_assistant_contents_plus_end_of_turn(tok: Any, case: str) -> None:
    row, answers, others = CASES[case]
    enc = enc_row(tok, row)
    spans = labelled_spans(tok, enc)
    assert spans == [a + IM_END for a in answers]
    full = tok.decode(enc.input_ids)
    labelled = "".join(spans)
    for text in others:  # user/system text is in the input but never labelled
        assert text in full
        assert text not in labelled
    assert "<|im_start|>" not in labelled


def test_detected_formats(tok: Any) -> None:
    assert detect_format(CASES["sharegpt"][0], "r") == "messages"
    assert detect_format(CASES["prompt_completion"][0], "r") == "prompt_completion"
    assert detect_format(CASES["alpaca"][0], "r") == "alpaca"
    assert detect_format({"text": "x", "id": 3}, "r") == "text"


def test_alpaca_input_is_joined_to_the_instruction(tok: Any) -> None:
    enc = enc_row(tok, CASES["alpaca_input"][0])
    assert "<|im_start|>user\nDouble x.\n\nx = 21<|im_end|>" in tok.decode(enc.input_ids)


def test_loss_on_last_turn_labels_only_the_final_answer(tok: Any) -> None:
    enc = enc_row(tok, MULTI, loss_on="last_turn")
    assert labelled_spans(tok, enc) == ["def sub(a, b):\n    return a - b" + IM_END]


def test_loss_on_all_labels_every_token(tok: Any) -> None:
    enc = enc_row(tok, MULTI, loss_on="all")
    assert enc.labels == enc.input_ids
    assert SYSTEM in tok.decode(enc.labels)


def test_text_format_labels_everything_and_ends_with_eos(tok: Any) -> None:
    enc = enc_row(tok, {"text": "print('hello')"})
    assert enc.labels == enc.input_ids
    assert enc.input_ids[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids) == "print('hello')" + tok.eos_token


def test_system_prompt_is_added_and_not_labelled(tok: Any) -> None:
    row = CASES["prompt_completion"][0]
    enc = enc_row(tok, row, system_prompt="Custom system prompt.")
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\nCustom system prompt.<|im_end|>")
    assert "SmolLM" not in text  # the template's default system prompt is replaced
    assert labelled_spans(tok, enc) == ["'cba'" + IM_END]


def test_existing_system_message_is_kept_over_system_prompt(tok: Any) -> None:
    enc = enc_row(tok, MULTI, system_prompt="Other.")
    text = tok.decode(enc.input_ids)
    assert SYSTEM in text and "Other." not in text


@pytest.mark.parametrize("loss_on", ["assistant", "last_turn", "all"])
def test_raw_template_concatenates_contents_with_eos_after_answers(tok: Any, loss_on: str) -> None:
    enc = enc_row(tok, MULTI, template="raw", loss_on=loss_on)
    text = tok.decode(enc.input_ids)
    assert "<|im_start|>" not in text
    a1, a2 = "def add(a, b):\n    return a + b", "def sub(a, b):\n    return a - b"
    assert text == SYSTEM + "Add two numbers." + a1 + tok.eos_token + "Now subtract." + a2 + tok.eos_token
    spans = labelled_spans(tok, enc)
    if loss_on == "assistant":
        assert spans == [a1 + tok.eos_token, a2 + tok.eos_token]
    elif loss_on == "last_turn":
        assert spans == [a2 + tok.eos_token]
    else:
        assert enc.labels == enc.input_ids


def test_template_that_rewrites_earlier_turns_is_refused(fresh_tok: Any) -> None:
    from tunelab.errors import UserError

    # a template that marks the *last* message specially changes earlier turns once more are appended
    fresh_tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} [END]{% endif %}\n{% endfor %}"
    )
    with pytest.raises(UserError, match="data.template=raw"):
        enc_row(fresh_tok, MULTI)


@pytest.mark.slow
def test_real_model_predicts_our_labels() -> None:
    """The embedded SmolLM2-Instruct finds our assistant labels easy (it was trained on this template) and a
    one-token misalignment hard: the masks line up with what the model actually predicts."""
    import torch

    from tunelab.config import ModelConfig
    from tunelab.data.packing import collate
    from tunelab.models import load_model
    from tunelab.objectives import OBJECTIVES

    model, tok = load_model(ModelConfig(name="smollm2-135m-instruct", dtype="float32"))
    rows = [
        {"messages": [{"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": "The capital of France is Paris."}]},
        {"messages": [{"role": "user", "content": "Write a Python function that adds two numbers."},
                      {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]},
    ]
    samples = [enc_row(tok, r) for r in rows]
    obj = OBJECTIVES.get("sft")(OBJECTIVES.config_class("sft")())
    packed = collate([samples], tok.pad_token_id, packed=True)
    padded = collate([[s] for s in samples], tok.pad_token_id, packed=False)
    wrong = dict(packed, labels=torch.cat([packed["labels"][:, 1:], torch.full_like(packed["labels"][:, :1], IGNORE)], 1))
    with torch.no_grad():
        loss = {k: obj.loss(model, b, obj.num_items(b))[0].item() for k, b in
                (("packed", packed), ("padded", padded), ("wrong", wrong))}
    assert loss["packed"] < 1.5, loss
    assert loss["padded"] == pytest.approx(loss["packed"], abs=1e-4)
    assert loss["wrong"] > 5 * loss["packed"]


# ----------------------------------------------------------------- template choice, fallback, from_turn, BOS/EOS


def _adds_bos(tok: Any) -> int:
    """Make `tok` prepend a BOS token when asked for special tokens (as Llama-style tokenizers do); SmolLM2's adds
    none, so without this a doubled BOS could never show."""
    from tokenizers.processors import TemplateProcessing

    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                       special_tokens=[("<|endoftext|>", bos)])
    assert tok("hi")["input_ids"][0] == bos != tok("hi", add_special_tokens=False)["input_ids"][0]
    return bos


def test_auto_template_follows_the_tokenizer(fresh_tok: Any) -> None:
    from tunelab.data.templating import has_chat_template, resolve_template

    assert [resolve_template(fresh_tok, t) for t in ("auto", "chat", "raw")] == ["chat", "chat", "raw"]
    fresh_tok.chat_template = None
    assert [resolve_template(fresh_tok, t) for t in ("auto", "chat", "raw")] == ["raw", "chat", "raw"]
    assert not has_chat_template(object())  # a tokenizer class without the attribute at all


def test_a_tokenizer_without_a_chat_template_gets_the_fallback(fresh_tok: Any) -> None:
    from tunelab.data.templating import render

    fresh_tok.chat_template = None
    msgs = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there"}]
    eos = fresh_tok.eos_token
    assert render(fresh_tok, msgs) == f"<|user|>\nSay hi.\n<|assistant|>\nhi there{eos}\n"
    assert render(fresh_tok, msgs[:1], add_generation_prompt=True) == "<|user|>\nSay hi.\n<|assistant|>\n"
    enc = enc_row(fresh_tok, {"messages": msgs})
    assert labelled_spans(fresh_tok, enc) == ["hi there" + eos]


def test_from_turn_labels_only_turns_at_or_after_it(tok: Any) -> None:
    """A preference pair's completion starts at message `from_turn`: earlier assistant turns are prompt."""
    a1, a2 = "def add(a, b):\n    return a + b", "def sub(a, b):\n    return a - b"
    want = {0: [a1, a2], 2: [a1, a2], 3: [a2], 4: [a2], 5: []}  # MULTI's assistant turns are messages 2 and 4
    for turn, answers in want.items():
        chat = enc_row(tok, MULTI, from_turn=turn)
        assert labelled_spans(tok, chat) == [a + IM_END for a in answers], turn
        raw = enc_row(tok, MULTI, template="raw", from_turn=turn)
        assert labelled_spans(tok, raw) == [a + tok.eos_token for a in answers], turn


def test_last_turn_with_three_answers(tok: Any) -> None:
    row = {"messages": [m for i in range(3) for m in ({"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"})]}
    assert labelled_spans(tok, enc_row(tok, row, loss_on="last_turn")) == ["a2" + IM_END]
    assert labelled_spans(tok, enc_row(tok, row)) == [f"a{i}" + IM_END for i in range(3)]


@pytest.mark.parametrize("template", ["model", "fallback"])
def test_a_conversation_opening_with_the_answer_does_not_learn_the_template_preamble(fresh_tok: Any, template: str) -> None:
    """A pair given as bare chosen/rejected answers has no prompt: the template still writes a default system
    prompt and the assistant header before the answer, and those are not the model's to learn."""
    if template == "fallback":
        fresh_tok.chat_template = None
    enc = enc_row(fresh_tok, {"messages": [{"role": "assistant", "content": "hello there"}]})
    assert labelled_spans(fresh_tok, enc) == ["hello there" + fresh_tok.eos_token]
    text = fresh_tok.decode(enc.input_ids)
    assert text.endswith("hello there" + fresh_tok.eos_token + "\n")
    assert ("SmolLM" in text) == (template == "model")  # the preamble is in the input, just not labelled
    for answer in ("XXXX marks the spot", "<|im_start|> is a token"):  # openings a marker could be mistaken for
        other = enc_row(fresh_tok, {"messages": [{"role": "assistant", "content": answer}]})
        assert labelled_spans(fresh_tok, other) == [answer + fresh_tok.eos_token]


def test_a_template_that_ends_a_whole_conversation_differently_is_refused(fresh_tok: Any) -> None:
    """Here each prefix ends with a marker that a longer conversation does not have at that point: the assistant
    turn's tokens would be found at the wrong place, so the row is refused with what to do."""
    from tunelab.errors import UserError

    fresh_tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if not add_generation_prompt %}[END]{% endif %}"
    )
    message = ("row: the model's chat template renders earlier turns differently once later turns are added, so "
               "assistant tokens cannot be located; set data.template=raw or data.loss_on=all")
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        enc_row(fresh_tok, MULTI)


def test_special_tokens_are_added_once(fresh_tok: Any) -> None:
    """Chat mode: the template writes every special token itself, so the tokenizer adds none (no doubled BOS).
    Raw mode: the tokenizer's BOS opens the text (once, not before each turn) and EOS ends every answer."""
    bos = _adds_bos(fresh_tok)
    chat = enc_row(fresh_tok, MULTI)
    assert bos not in chat.input_ids
    raw = enc_row(fresh_tok, MULTI, template="raw")
    assert raw.input_ids[0] == bos and raw.input_ids.count(bos) == 1
    text = enc_row(fresh_tok, {"text": "print(1)"})
    assert text.input_ids[0] == bos and text.input_ids[-1] == fresh_tok.eos_token_id and text.input_ids.count(bos) == 1


def test_raw_mode_without_an_eos_token(fresh_tok: Any) -> None:
    fresh_tok.eos_token = None
    assert fresh_tok.eos_token_id is None
    enc = enc_row(fresh_tok, MULTI, template="raw")
    assert None not in enc.input_ids
    assert fresh_tok.decode(enc.input_ids) == SYSTEM + "Add two numbers." + "def add(a, b):\n    return a + b" + "Now subtract." + "def sub(a, b):\n    return a - b"
