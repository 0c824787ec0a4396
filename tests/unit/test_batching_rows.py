"""Rows of every batch format, checked exactly: the one-line error each malformed row raises (file:line, the
field, the format), the text and the learnt tokens of every well-formed row's sequences (the KTO mismatched
pairs included), the rows dropped and why, and the collated tensors, written out by hand.

Files are encoded with `tokenize`, the encoder that `tokenize_cached` wraps: no cache key to hash, so a case
costs milliseconds. The expected texts spell out the tiny model's (SmolLM2) chat template.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import IM_END

from tunelab.config import DataConfig
from tunelab.data import TokenizedSet, tokenize
from tunelab.data.batching import BATCHERS, Batcher, Unit, get_batcher
from tunelab.data.batching._base import EncodeContext, register
from tunelab.data.templating import IGNORE, Encoded
from tunelab.errors import UserError

P = "Write add(a, b)."
GOOD = "def add(a, b):\n    return a + b"
BAD = "def add(a, b):\n    return a - b"
SUB = "def sub(a, b):\n    return a - b"
ROLES = "['assistant', 'system', 'tool', 'user']"
# what the template writes before a conversation that has no system turn of its own
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
OPEN = "<|im_start|>assistant\n"  # the generation prompt


def turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}{IM_END}\n"


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def load(path: Path, tok: Any, fmt: str, **cfg: Any) -> TokenizedSet:
    return tokenize(str(path), tok, DataConfig(train=str(path), **({"max_length": 256} | cfg)), "train", fmt)


def encode(tok: Any, fmt: str, row: dict[str, Any], template: str = "chat", **cfg: Any) -> Any:
    ctx = EncodeContext(tok, DataConfig(train="rows.jsonl", **cfg), template)
    return get_batcher(fmt).encode(row, "rows.jsonl:1", ctx)


def text(tok: Any, seq: Encoded) -> str:
    return tok.decode(seq.input_ids)


def learned(tok: Any, seq: Encoded) -> str:
    return tok.decode([t for t in seq.labels if t != IGNORE])


@pytest.fixture(scope="module")
def bos_tok(tok: Any) -> Any:
    """The tiny tokenizer made to open every encoding with BOS, as Llama's does, to show where special tokens go."""
    from tokenizers.processors import TemplateProcessing

    t = copy.deepcopy(tok)
    bos = t.bos_token
    t._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                     special_tokens=[(bos, t.bos_token_id)])
    return t


# ------------------------------------------------------------------------------------------- malformed rows

WELL_FORMED = {
    "sft": {"messages": [user(P), assistant(GOOD)]},
    "pairwise": {"prompt": P, "chosen": GOOD, "rejected": BAD},
    "ranked": {"prompt": P, "responses": [GOOD, BAD], "scores": [1, 0]},
    "unpaired": {"prompt": P, "completion": GOOD, "label": True},
    "multi_target": {"prompt": P, "targets": [GOOD, "It adds."]},
    "prompt_only": {"prompt": P},
    "feedback": {"prompt": P, "attempt": BAD, "feedback": "failed", "reward": False},
}
NOT_SCORED = "a response is empty (no assistant text to score)"
NO_SHARED_PROMPT = ("without a 'prompt' field, 'chosen' and 'rejected' must be conversations that share their opening "
                    "turns (the prompt); these share none")
NOT_MESSAGES = "must be a non-empty string or a list of messages"

MALFORMED = [
    # sft: the first row fixes the row format for the file
    ("sft", {"prompt": P, "completion": GOOD}, "'messages' must be a non-empty list of {role, content} objects"),
    ("sft", {"messages": [user(P)]}, "conversation has no assistant message, so nothing to learn from"),
    # pairwise, with a prompt
    ("pairwise", {"prompt": P, "chosen": GOOD},
     "missing field 'rejected' for pairwise data (rows need: prompt, chosen, rejected; found: chosen, prompt)"),
    ("pairwise", {"prompt": "", "chosen": GOOD, "rejected": BAD}, "field 'prompt' is empty"),
    ("pairwise", {"prompt": user(P), "chosen": GOOD, "rejected": BAD}, f"field 'prompt' {NOT_MESSAGES}"),
    ("pairwise", {"prompt": [], "chosen": GOOD, "rejected": BAD}, f"field 'prompt' {NOT_MESSAGES}"),
    ("pairwise", {"prompt": P, "chosen": GOOD, "rejected": " "}, "field 'rejected' is empty"),
    ("pairwise", {"prompt": P, "chosen": [user("ok?")], "rejected": BAD}, NOT_SCORED),
    ("pairwise", {"prompt": P, "chosen": GOOD, "rejected": [assistant("  ")]}, NOT_SCORED),
    # pairwise, whole conversations
    ("pairwise", {}, "missing field 'chosen' for pairwise data (rows need: chosen, rejected; found: nothing)"),
    ("pairwise", {"chosen": GOOD, "label": 1},
     "missing field 'rejected' for pairwise data (rows need: chosen, rejected; found: chosen, label)"),
    ("pairwise", {"chosen": "", "rejected": BAD}, "field 'chosen' is empty"),
    ("pairwise", {"chosen": GOOD, "rejected": "\n"}, "field 'rejected' is empty"),
    ("pairwise", {"chosen": [user("Hi."), assistant(GOOD)], "rejected": [user("Hello."), assistant(BAD)]}, NO_SHARED_PROMPT),
    # a shared assistant greeting is not a prompt
    ("pairwise", {"chosen": [assistant("Hi!"), user(P), assistant(GOOD)],
                  "rejected": [assistant("Hi!"), user("Sub?"), assistant(SUB)]},
     NO_SHARED_PROMPT),
    # ranked
    ("ranked", {"prompt": P, "responses": [GOOD, BAD]},
     "missing field 'scores' for ranked data (rows need: prompt, responses, scores; found: prompt, responses)"),
    ("ranked", {"prompt": P, "responses": GOOD, "scores": [1]}, "'responses' must be a list of at least 2 responses"),
    ("ranked", {"prompt": P, "responses": [GOOD, BAD], "scores": [1.0]},
     "'scores' must be a list with one number per response (2 responses, got 1)"),
    ("ranked", {"prompt": P, "responses": [GOOD, BAD], "scores": 1.0},
     "'scores' must be a list with one number per response (2 responses, got float)"),
    ("ranked", {"prompt": P, "responses": [GOOD, BAD], "scores": [1, True]}, "'scores' must all be numbers"),
    ("ranked", {"prompt": " ", "responses": [GOOD, BAD], "scores": [1, 0]}, "field 'prompt' is empty"),
    ("ranked", {"prompt": P, "responses": [GOOD, ""], "scores": [1, 0]}, "field 'responses[1]' is empty"),
    ("ranked", {"prompt": P, "responses": [GOOD, [{"content": BAD}]], "scores": [1, 0]},
     f"responses[1][0] must be an object with a role ({ROLES}) and string content"),
    ("ranked", {"prompt": P, "responses": [GOOD, [user("?")]], "scores": [1, 0]}, NOT_SCORED),
    # unpaired
    ("unpaired", {"prompt": P, "label": False},
     "missing field 'completion' for unpaired data (rows need: prompt, completion, label; found: label, prompt)"),
    ("unpaired", {"prompt": P, "completion": GOOD, "label": 2},
     "'label' must be true (desirable) or false (undesirable), got 2"),
    ("unpaired", {"prompt": P, "completion": GOOD, "label": None},
     "'label' must be true (desirable) or false (undesirable), got None"),
    ("unpaired", {"prompt": "", "completion": GOOD, "label": True}, "field 'prompt' is empty"),
    ("unpaired", {"prompt": P, "completion": "", "label": True}, "field 'completion' is empty"),
    ("unpaired", {"prompt": P, "completion": [user("?")], "label": True}, NOT_SCORED),
    # multi_target
    ("multi_target", {"targets": [GOOD, "It adds."]},
     "missing field 'prompt' for multi_target data (rows need: prompt, targets; found: targets)"),
    ("multi_target", {"prompt": P, "targets": [GOOD]},
     "'targets' must be a list of at least 2 targets (e.g. [patch, rationale])"),
    ("multi_target", {"prompt": P, "targets": GOOD},
     "'targets' must be a list of at least 2 targets (e.g. [patch, rationale])"),
    ("multi_target", {"prompt": P, "targets": [GOOD, "a", "b"]},
     "3 targets, but earlier rows have 2; every row needs the same number"),
    ("multi_target", {"prompt": "", "targets": [GOOD, "It adds."]}, "field 'prompt' is empty"),
    ("multi_target", {"prompt": P, "targets": [GOOD, ""]}, "field 'targets[1]' is empty"),
    ("multi_target", {"prompt": P, "targets": [GOOD, [user("Why?")]]}, NOT_SCORED),
    # prompt_only
    ("prompt_only", {"text": P}, "missing field 'prompt' for prompt_only data (rows need: prompt; found: text)"),
    ("prompt_only", {"prompt": ""}, "field 'prompt' is empty"),
    ("prompt_only", {"prompt": [{"role": "user"}]}, f"prompt[0] must be an object with a role ({ROLES}) and string content"),
    # feedback (the rest of its errors: test_leti.py)
    ("feedback", {"prompt": "", "attempt": BAD, "feedback": "", "reward": 0}, "field 'prompt' is empty"),
    ("feedback", {"prompt": P, "attempt": [user("?")], "feedback": "", "reward": 0},
     "'attempt' is empty (no assistant text to learn)"),
    ("feedback", {"prompt": P, "attempt": [assistant(" ")], "feedback": "", "reward": 0},
     "'attempt' is empty (no assistant text to learn)"),
]


@pytest.mark.parametrize(("fmt", "row", "message"), MALFORMED)
def test_malformed_row_raises_one_exact_line(jsonl: Any, tok: Any, fmt: str, row: dict[str, Any], message: str) -> None:
    path = jsonl([WELL_FORMED[fmt], row])
    with pytest.raises(UserError, match="^" + re.escape(f"{path}:2: {message}") + "$"):
        load(path, tok, fmt)


def test_a_template_that_rewrites_earlier_turns_names_the_row(jsonl: Any, tok: Any) -> None:
    numbered = copy.deepcopy(tok)  # a template that numbers the turns: a prefix no longer renders as a prefix
    numbered.chat_template = ("{{ messages | length }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                              "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    path = jsonl(["", WELL_FORMED["pairwise"]])  # a blank line still counts
    want = (f"{path}:2: the model's chat template renders earlier turns differently once later turns are added, so "
            "assistant tokens cannot be located; set data.template=raw or data.loss_on=all")
    with pytest.raises(UserError, match="^" + re.escape(want) + "$"):
        load(path, numbered, "pairwise")


def test_prompt_filling_max_length_is_an_error_one_token_of_room_is_not(jsonl: Any, tok: Any) -> None:
    prompt = DEFAULT_SYSTEM + turn("user", P) + OPEN
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    path = jsonl([WELL_FORMED["pairwise"]])
    want = (f"{path}:1: the prompt alone is {n} tokens, leaving no room under data.max_length={n}; "
            "raise data.max_length or shorten the prompt")
    with pytest.raises(UserError, match="^" + re.escape(want) + "$"):
        load(path, tok, "pairwise", max_length=n)
    # room for one completion token: kept, cut to it
    ts = load(path, tok, "pairwise", max_length=n + 1, truncation="truncate")
    assert ts.truncated == 1
    for seq, completion in zip(ts.samples[0].seqs, (GOOD, BAD), strict=True):
        ids = tok(prompt + completion + IM_END + "\n", add_special_tokens=False)["input_ids"][: n + 1]
        assert seq.input_ids == ids and seq.labels == [IGNORE] * n + ids[n:]


# ------------------------------------------------------------------------------------------- dropped rows


def test_dropped_rows_are_counted_by_reason(jsonl: Any, tok: Any) -> None:
    conversation = [user(P), assistant(GOOD)]
    rows = [
        {"prompt": P, "chosen": GOOD, "rejected": GOOD},
        {"prompt": P, "chosen": GOOD, "rejected": [assistant(GOOD)]},  # the same pair, written two ways
        {"chosen": conversation, "rejected": conversation},
        WELL_FORMED["pairwise"],
        {"prompt": P, "chosen": GOOD * 20, "rejected": BAD},  # longer than max_length
    ]
    ts = load(jsonl(rows), tok, "pairwise", max_length=128)
    assert (ts.rows, ts.dropped_other, ts.dropped_too_long, ts.dropped_no_labels) == (5, {"identical_pair": 3}, 1, 0)
    assert [u.sid for u in ts.samples] == [0] and [learned(tok, s) for s in ts.samples[0].seqs] == [GOOD + IM_END, BAD + IM_END]


def test_a_file_of_dropped_rows_is_an_error_that_counts_them(jsonl: Any, tok: Any) -> None:
    path = jsonl([{"prompt": P, "chosen": GOOD, "rejected": GOOD}] * 2)
    want = (f"{path}: all 2 samples are unusable (0 longer than data.max_length=256, 0 with no tokens to learn, "
            "2 identical pair); raise data.max_length")
    with pytest.raises(UserError, match="^" + re.escape(want) + "$"):
        load(path, tok, "pairwise")


# ------------------------------------------------------------------------------------------- pairwise


@pytest.mark.parametrize(
    ("chosen", "rejected", "want"),
    [
        (GOOD, BAD, [GOOD + IM_END, BAD + IM_END]),
        # the answers differ, the follow-up is the same: the prompt ends before the first answer
        ([user(P), assistant(GOOD), user("Now sub."), assistant(SUB)],
         [user(P), assistant(BAD), user("Now sub."), assistant(SUB)],
         [GOOD + IM_END + SUB + IM_END, BAD + IM_END + SUB + IM_END]),
        # the rejected conversation goes on
        ([user(P), assistant(GOOD)], [user(P), assistant(BAD), user("And sub?"), assistant(SUB)],
         [GOOD + IM_END, BAD + IM_END + SUB + IM_END]),
        # chosen stops where rejected goes on: a completion starts at an assistant turn, so the last shared answer
        # is completion (learnt by both), the earlier one stays prompt
        ([user("Hi."), assistant("Hello!"), user(P), assistant(GOOD)],
         [user("Hi."), assistant("Hello!"), user(P), assistant(GOOD), user("And sub?"), assistant(SUB)],
         [GOOD + IM_END, GOOD + IM_END + SUB + IM_END]),
    ],
    ids=["strings", "first-answer-differs", "rejected-goes-on", "shared-history"],
)
def test_conversation_pairs_split_where_they_differ(jsonl: Any, tok: Any, chosen: Any, rejected: Any, want: list[str]) -> None:
    ts = load(jsonl([{"chosen": chosen, "rejected": rejected}]), tok, "pairwise")
    (u,) = ts.samples
    assert [learned(tok, s) for s in u.seqs] == want


def test_system_prompt_opens_the_prompt_and_only_completions_learn(jsonl: Any, tok: Any) -> None:
    history = [user("Hi."), assistant("Hello!"), user(P)]
    rows = [
        {"prompt": history, "chosen": GOOD, "rejected": BAD},
        {"prompt": [{"role": "system", "content": "Answer in Python."}, user(P)], "chosen": GOOD, "rejected": BAD},
    ]
    ts = load(jsonl(rows), tok, "pairwise", system_prompt="Be terse.")
    opening = [turn("system", "Be terse.") + turn("user", "Hi.") + turn("assistant", "Hello!") + turn("user", P),
               turn("system", "Answer in Python.") + turn("user", P)]  # the row's own system turn wins
    for u, prompt in zip(ts.samples, opening, strict=True):
        assert [text(tok, s) for s in u.seqs] == [prompt + turn("assistant", GOOD), prompt + turn("assistant", BAD)]
        assert [learned(tok, s) for s in u.seqs] == [GOOD + IM_END, BAD + IM_END]


def test_raw_template_learns_every_assistant_turn_of_a_completion(jsonl: Any, tok: Any) -> None:
    row = {"prompt": P, "chosen": [assistant("Sure."), user("Go on."), assistant(GOOD)], "rejected": BAD}
    (u,) = load(jsonl([row]), tok, "pairwise", template="raw").samples
    assert [text(tok, s) for s in u.seqs] == [P + "Sure." + IM_END + "Go on." + GOOD + IM_END, P + BAD + IM_END]
    assert [learned(tok, s) for s in u.seqs] == ["Sure." + IM_END + GOOD + IM_END, BAD + IM_END]


# ------------------------------------------------------------------------------------------- ranked, multi_target


def test_ranked_row_holds_every_response_after_one_prompt(jsonl: Any, tok: Any) -> None:
    row = {"prompt": P, "responses": [GOOD, BAD, [assistant("pass")]], "scores": [1, 0, -2.5]}
    (u,) = load(jsonl([row]), tok, "ranked").samples
    prompt = DEFAULT_SYSTEM + turn("user", P)
    assert [text(tok, s) for s in u.seqs] == [prompt + turn("assistant", r) for r in (GOOD, BAD, "pass")]
    assert [learned(tok, s) for s in u.seqs] == [GOOD + IM_END, BAD + IM_END, "pass" + IM_END]
    assert u.meta == {"scores": [1.0, 0.0, -2.5]} and all(type(s) is float for s in u.meta["scores"])


def test_multi_target_row_holds_every_target_after_one_prompt(jsonl: Any, tok: Any) -> None:
    rows = [
        {"prompt": [{"role": "system", "content": "Be terse."}, user(P)], "targets": [GOOD, [assistant("It adds.")]]},
        {"prompt": P, "targets": [BAD, "It subtracts."]},
    ]
    ts = load(jsonl(rows), tok, "multi_target")
    prompts = [turn("system", "Be terse.") + turn("user", P), DEFAULT_SYSTEM + turn("user", P)]
    targets = [(GOOD, "It adds."), (BAD, "It subtracts.")]
    assert [[text(tok, s) for s in u.seqs] for u in ts.samples] == [
        [p + turn("assistant", t) for t in row] for p, row in zip(prompts, targets, strict=True)
    ]
    assert [[learned(tok, s) for s in u.seqs] for u in ts.samples] == [[t + IM_END for t in row] for row in targets]


# ------------------------------------------------------------------------------------------- unpaired (KTO)


def test_unpaired_rows_and_their_mismatched_kl_sequences(jsonl: Any, tok: Any) -> None:
    long_prompt = "Write add(a, b), with a docstring, type hints and a doctest for each of the usual cases."
    rows = [
        {"prompt": long_prompt, "completion": "pass", "label": True},
        {"prompt": "sub?", "completion": SUB + "  # subtracts b from a, as asked", "label": 0},
        {"prompt": [user("mul?")], "completion": [assistant("def mul(a, b): ...")], "label": " No "},
    ]
    prompts = [long_prompt, "sub?", "mul?"]
    completions = [r["completion"] for r in rows[:2]] + ["def mul(a, b): ..."]

    def expected(i: int, j: int) -> tuple[list[int], list[int]]:
        """Prompt i + completion j: its ids, and labels on the completion and its end-of-turn token only."""
        prompt = DEFAULT_SYSTEM + turn("user", prompts[i]) + OPEN
        ids = tok(prompt + completions[j] + IM_END + "\n", add_special_tokens=False)["input_ids"]
        n = len(tok(prompt, add_special_tokens=False)["input_ids"])
        return ids, [IGNORE] * n + ids[n:-1] + [IGNORE]

    max_length = max(len(expected(i, i)[0]) for i in range(3)) + 1
    ts = load(jsonl(rows), tok, "unpaired", max_length=max_length)
    assert [u.meta for u in ts.samples] == [{"desirable": True}, {"desirable": False}, {"desirable": False}]
    assert [u.sid for u in ts.samples] == [0, 1, 2]
    for i, u in enumerate(ts.samples):
        own, kl = u.seqs
        assert (own.input_ids, own.labels) == expected(i, i)
        ids, labels = expected(i, (i + 1) % 3)  # prompt i with the next row's completion (cyclic)
        assert (kl.input_ids, kl.labels) == (ids[:max_length], labels[:max_length])  # cut like any sequence
    assert len(expected(0, 1)[0]) > max_length  # the long prompt with the long completion was cut


# ------------------------------------------------------------------------------------------- prompt_only


def test_prompt_only_renders_the_generation_prompt_and_learns_nothing(tok: Any, bos_tok: Any) -> None:
    want = DEFAULT_SYSTEM + turn("user", P) + OPEN
    for t in (tok, bos_tok):  # the template writes its own special tokens: no BOS added in front of them
        (seq,) = encode(t, "prompt_only", {"prompt": P}).seqs
        assert seq.input_ids == tok(want, add_special_tokens=False)["input_ids"]
        assert seq.labels == [IGNORE] * len(seq.input_ids)


def test_prompt_only_raw_joins_the_turns_by_lines(tok: Any, bos_tok: Any) -> None:
    row = {"prompt": [{"role": "system", "content": "Be terse."}, user(P)]}
    (seq,) = encode(tok, "prompt_only", row, template="raw").seqs
    assert text(tok, seq) == "Be terse.\n" + P and seq.labels == [IGNORE] * len(seq.input_ids)
    (seq,) = encode(bos_tok, "prompt_only", row, template="raw").seqs
    assert seq.input_ids == [tok.bos_token_id, *tok("Be terse.\n" + P)["input_ids"]]  # raw text starts as in training


def test_prompt_only_takes_the_system_prompt_like_every_trained_format(tok: Any) -> None:
    (seq,) = encode(tok, "prompt_only", {"prompt": P}, system_prompt="Be terse.").seqs
    assert text(tok, seq) == turn("system", "Be terse.") + turn("user", P) + OPEN
    (seq,) = encode(tok, "prompt_only", {"prompt": P}, template="raw", system_prompt="Be terse.").seqs
    assert text(tok, seq) == "Be terse.\n" + P
    own = {"prompt": [{"role": "system", "content": "Mine."}, user(P)]}  # a row's own system turn wins
    (seq,) = encode(tok, "prompt_only", own, system_prompt="Be terse.").seqs
    assert text(tok, seq) == turn("system", "Mine.") + turn("user", P) + OPEN


def test_prompt_only_collates_left_padded(tok: Any) -> None:
    a = Unit([Encoded([5, 6, 7], [IGNORE] * 3)], sid=3)
    b = Unit([Encoded([8, 9], [IGNORE] * 2)], sid=7)
    batcher = get_batcher("prompt_only")
    for rows, packed in (([[a], [b]], False), ([[a, b]], True)):  # always one prompt per row
        batch = batcher.collate(rows, pad_id=0, packed=packed)
        assert sorted(batch) == ["attention_mask", "input_ids", "sample_ids"]
        assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
        assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
        assert batch["sample_ids"].tolist() == [3, 7]


# ------------------------------------------------------------------------------------------- feedback (raw)

FAILED = {"prompt": P, "attempt": BAD, "feedback": "failed: boom", "reward": False}
BAD_PREFIX = "<|bad|><|lang_feedback|>failed: boom<|/lang_feedback|>\n"


def test_feedback_raw_system_prompt_is_context_not_learnt(tok: Any) -> None:
    (seq,) = encode(tok, "feedback", FAILED, template="raw", system_prompt="Be terse.").seqs
    assert text(tok, seq) == BAD_PREFIX + "Be terse." + P + BAD + IM_END
    assert learned(tok, seq) == P + BAD + IM_END
    own = FAILED | {"prompt": [{"role": "system", "content": "Answer in Python."}, user(P)]}  # its own system turn wins
    (seq,) = encode(tok, "feedback", own, template="raw", system_prompt="Be terse.").seqs
    assert text(tok, seq) == BAD_PREFIX + "Answer in Python." + P + BAD + IM_END
    assert learned(tok, seq) == P + BAD + IM_END


def test_feedback_raw_sequence_opens_with_the_tokenizers_bos(bos_tok: Any) -> None:
    (seq,) = encode(bos_tok, "feedback", FAILED | {"reward": True}, template="raw").seqs
    assert seq.input_ids[0] == bos_tok.bos_token_id and seq.labels[0] == IGNORE
    assert text(bos_tok, seq) == bos_tok.bos_token + "<|good|>\n" + P + BAD + IM_END  # one BOS, before the prefix
    assert learned(bos_tok, seq) == P + BAD + IM_END


# ------------------------------------------------------------------------------------------- collation by hand

# two units of two sequences each (token ids are arbitrary); labels unshifted, IGNORE on each prompt
U0 = [Encoded([11, 12, 13], [IGNORE, 12, 13]), Encoded([11, 14], [IGNORE, 14])]
U1 = [Encoded([21, 22, 23, 24], [IGNORE, IGNORE, 23, 24]), Encoded([21, 25], [IGNORE, 25])]
X = IGNORE
LAYOUTS = {  # name: (packed, rows of unit indices, tensors); labels shifted: the target at t is token t+1
    "padded": (False, [[0], [1]], {  # one sequence per tensor row, right-padded
        "input_ids": [[11, 12, 13, 0], [11, 14, 0, 0], [21, 22, 23, 24], [21, 25, 0, 0]],
        "labels": [[12, 13, X, X], [14, X, X, X], [X, 23, 24, X], [25, X, X, X]],
        "attention_mask": [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]],
        "seq_index": [[0, 0, -1, -1], [1, -1, -1, -1], [-1, 2, 2, -1], [3, -1, -1, -1]],
    }),
    "packed": (True, [[0], [1]], {  # a unit per row, its sequences one after another, positions restarting
        "input_ids": [[11, 12, 13, 11, 14, 0], [21, 22, 23, 24, 21, 25]],
        "labels": [[12, 13, X, 14, X, X], [X, 23, 24, X, 25, X]],
        "position_ids": [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]],
        "seq_index": [[0, 0, -1, 1, -1, -1], [-1, 2, 2, -1, 3, -1]],
    }),
    "packed-together": (True, [[0, 1]], {  # both units in one row
        "input_ids": [[11, 12, 13, 11, 14, 21, 22, 23, 24, 21, 25]],
        "labels": [[12, 13, X, 14, X, X, 23, 24, X, 25, X]],
        "position_ids": [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1]],
        "seq_index": [[0, 0, -1, 1, -1, -1, 2, 2, -1, 3, -1]],
    }),
}


@pytest.mark.parametrize(
    ("fmt", "metas", "extra"),
    [
        ("pairwise", [{}, {}], {}),
        ("ranked", [{"scores": [1.0, 0.0]}, {"scores": [0.5, 2.0]}],
         {"scores": torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=torch.float32),
          "seq_unit": torch.tensor([0, 0, 1, 1], dtype=torch.long)}),
        ("multi_target", [{}, {}], {"target_index": torch.tensor([0, 1, 0, 1], dtype=torch.long)}),
        ("unpaired", [{"desirable": True}, {"desirable": False}], {"desirable": torch.tensor([True, False], dtype=torch.bool)}),
    ],
)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_collated_batch_by_hand(fmt: str, metas: list[dict[str, Any]], extra: dict[str, torch.Tensor], layout: str) -> None:
    packed, rows, tensors = LAYOUTS[layout]
    units = [Unit(list(U0), metas[0], sid=4), Unit(list(U1), metas[1], sid=9)]
    batch = get_batcher(fmt).collate([[units[i] for i in row] for row in rows], pad_id=0, packed=packed)
    want = {k: torch.tensor(v) for k, v in tensors.items()}
    want |= {"real_tokens": torch.tensor(11), "num_seqs": torch.tensor(4), "sample_ids": torch.tensor([4, 9])} | extra
    assert sorted(batch) == sorted(want)
    for key, value in want.items():
        assert batch[key].dtype == value.dtype and batch[key].tolist() == value.tolist(), key


# ------------------------------------------------------------------------------------------- registry


def test_a_plugin_batcher_registers_under_its_name_once() -> None:
    class Listwise(Batcher):
        pass

    try:
        assert register("test_listwise")(Listwise) is Listwise
        assert Listwise.format == "test_listwise" and type(get_batcher("test_listwise")) is Listwise
        with pytest.raises(RuntimeError, match="^batcher 'test_listwise' registered twice$"):
            register("test_listwise")(Batcher)
        assert type(get_batcher("test_listwise")) is Listwise
    finally:
        BATCHERS.pop("test_listwise", None)


def test_unknown_format_error_lists_the_formats() -> None:
    want = "no batcher for batch format 'listwise' (have: feedback, multi_target, pairwise, prompt_only, ranked, sft, unpaired)"
    with pytest.raises(NotImplementedError, match="^" + re.escape(want) + "$"):
        get_batcher("listwise")
