"""Chat templating and loss masks: labelled tokens are exactly each assistant turn's content + <|im_end|>."""

from __future__ import annotations

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
