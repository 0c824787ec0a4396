"""R-Tuning training data: teach the model to say when it does not know (Zhang, Diao, et al., NAACL 2024,
"R-Tuning: Instructing Large Language Models to Say 'I Don't Know'", arXiv 2311.09677).

Step 1, knowledge split: the PRE-TRAINED model (the one about to be tuned) answers every training question
from the prompt "Question: {q} Answer:" greedily (at most 15 new tokens), the answer is cut at its first
'.', and the question is "known" when the gold answer string occurs in that prediction (here ignoring case),
else "unknown".

Step 2, refusal-aware rows, `prompt`/`completion` format, prompt = "Question: {q} Answer:":
- `unsure` (R-Tuning, the paper's main variant): completion = " {gold}. Are you sure you accurately answered
  the question based on your internal knowledge?" + " I am sure." (known) or " I am unsure." (unknown). The
  gold answer is always kept; only the suffix says whether the model knew it.
- `unknown` (R-Tuning-R): known -> " {gold}."; unknown -> " " + a refusal sentence drawn at random (seeded)
  from `REFUSALS`.

Training is then plain SFT on the file (`objective: sft`). The paper trains the language-model loss on the
whole text (question included); to match it set `data.template: raw` and `data.loss_on: all` (the default,
loss on the completion only, is a variant; raw mode joins prompt and completion as written here).

Evaluation helpers, as in the paper's evaluation: `sure_confidence` reads P(sure) / (P(sure) + P(unsure)) for
the next token after "... Are you sure ...? I am", and `ap_score` is the average precision of correctness
ranked by confidence (scikit-learn's `average_precision_score` definition), the paper's metric.

Deviations: the paper's code matches the gold answer case-sensitively (we ignore case, as specified for
tunelab) and its inference prompt has no space after "Question:" (we use "Question: {q} Answer:", the form
of its training text). Its list of refusal sentences has 16 entries; `REFUSALS` is a shorter list of our own
in the same spirit. The third variant (R-Tuning-U: entropy over 5 sampled answers) is not built here.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunelab.errors import UserError

PROMPT = "Question: {question} Answer:"
SURE_QUESTION = " Are you sure you accurately answered the question based on your internal knowledge?"
SURE, UNSURE = " I am sure.", " I am unsure."
REFUSALS = (
    "I do not know the answer.",
    "The answer is unknown.",
    "I am not able to answer this question.",
    "I cannot say for certain.",
    "I don't have enough knowledge to answer that.",
    "The answer to this is not known to me.",
)
Variant = Literal["unsure", "unknown"]


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    where: str  # file:line


def load_qa(path: str | Path, limit: int | None = None) -> list[QA]:
    """Rows {"question", "answer"} (both non-empty strings); a bad row is a UserError naming file:line."""
    from tunelab.evaluate.tasks._base import read_jsonl

    p = Path(path).expanduser()
    out = []
    for lineno, row in read_jsonl(p, "data refusal-aware --data"):
        where = f"{p}:{lineno}"
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UserError(f"{where}: '{key}' must be a non-empty string (rows are {{\"question\", \"answer\"}})")
        out.append(QA(row["question"].strip(), row["answer"].strip(), where))
    return out[:limit] if limit else out


def prompt(question: str) -> str:
    return PROMPT.format(question=question)


def cut_answer(text: str) -> str:
    """The prediction up to (not including) its first '.'; all of it when there is none."""
    return text.split(".", 1)[0]


def is_known(prediction: str, answer: str) -> bool:
    """The paper's knowledge test: the gold answer occurs in the (cut) prediction; case is ignored."""
    return answer.lower() in cut_answer(prediction).lower()


def refusal_rows(
    qas: Sequence[QA], predictions: Sequence[str], variant: Variant = "unsure", seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """SFT rows {prompt, completion, known, prediction} and the known/unknown counts."""
    if variant not in ("unsure", "unknown"):
        raise UserError(f"data refusal-aware: --variant must be unsure or unknown, got {variant!r}")
    rng = random.Random(seed)
    rows, stats = [], {"questions": len(qas), "known": 0, "unknown": 0}
    for qa, pred in zip(qas, predictions, strict=True):
        known = is_known(pred, qa.answer)
        stats["known" if known else "unknown"] += 1
        if variant == "unsure":
            completion = f" {qa.answer}.{SURE_QUESTION}{SURE if known else UNSURE}"
        else:
            completion = f" {qa.answer}." if known else f" {rng.choice(REFUSALS)}"
        rows.append({"prompt": prompt(qa.question), "completion": completion, "known": known, "prediction": cut_answer(pred)})
    return rows, stats


def predict(model: Any, tok: Any, questions: Sequence[str], *, max_new_tokens: int = 15, batch_size: int = 16) -> list[str]:
    """Greedy answers to "Question: {q} Answer:" (raw text, no chat template), cut at the first '.'."""
    from tunelab.generate.engine import Engine, SamplingSettings

    # stopping at '.' gives the same text as decoding max_new_tokens and cutting, with less work
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, stop=(".",))
    done = Engine(model, tok, batch_size=batch_size).generate([prompt(q) for q in questions], settings)
    return [cut_answer(c[0].text) for c in done]


def build_rtuning(
    model: Any, tok: Any, data: str | Path, out: Path, *, variant: Variant = "unsure", max_new_tokens: int = 15,
    batch_size: int = 16, limit: int | None = None, seed: int = 0,
) -> dict[str, Any]:
    """Split the QA file into known/unknown by the model's greedy answers and write the refusal-aware rows."""
    qas = load_qa(data, limit)
    predictions = predict(model, tok, [qa.question for qa in qas], max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows, stats = refusal_rows(qas, predictions, variant, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    return {**stats, "variant": variant, "out": str(out)}


# ------------------------------------------------------------------------------------------- evaluation


def ap_score(correct: list[bool], confidence: list[float]) -> float:
    """Average precision of `correct` ranked by `confidence`: sum over thresholds of (R_n - R_{n-1}) P_n.

    The thresholds are the distinct confidence values, highest first; at each, P_n and R_n are the precision
    and recall of calling every answer with confidence >= it correct (ties enter together), R_0 = 0. This is
    scikit-learn's `average_precision_score` (no interpolation).
    """
    if len(correct) != len(confidence):
        raise ValueError(f"ap_score: {len(correct)} labels but {len(confidence)} confidences")
    positives = sum(bool(c) for c in correct)
    if positives == 0:
        raise ValueError("ap_score: no correct answer, so average precision is undefined")
    order = sorted(range(len(correct)), key=lambda i: -confidence[i])
    ap = recall_before = 0.0
    tp = seen = 0
    for k, i in enumerate(order):
        tp += bool(correct[i])
        seen += 1
        if k + 1 < len(order) and confidence[order[k + 1]] == confidence[i]:
            continue  # a tie: the threshold takes the whole group at once
        recall = tp / positives
        ap += (recall - recall_before) * (tp / seen)
        recall_before = recall
    return ap


def _next_token(tok: Any, context: str, word: str) -> int:
    """The id of the first token `word` adds after `context` (tokenized together, as the model reads it)."""
    ctx = tok(context)["input_ids"]
    full = tok(context + word)["input_ids"]
    if full[: len(ctx)] != ctx or len(full) <= len(ctx):
        raise UserError(f"sure_confidence: {word!r} does not tokenize as a continuation of the context")
    return full[len(ctx)]


def sure_confidence(model: Any, tok: Any, prompt_with_answer: str) -> float:
    """P(sure) / (P(sure) + P(unsure)) for the token after `prompt_with_answer` + SURE_QUESTION + " I am".

    `prompt_with_answer` is e.g. "Question: {q} Answer: {a}." (the paper feeds the model's own answer). The
    two probabilities are those of the first token of " sure" and of " unsure" (the whole word when it is
    one token), renormalised over the two, as the paper's evaluation does.
    """
    import torch

    context = prompt_with_answer + SURE_QUESTION + " I am"
    sure, unsure = _next_token(tok, context, " sure"), _next_token(tok, context, " unsure")
    if sure == unsure:
        raise UserError("sure_confidence: ' sure' and ' unsure' start with the same token in this tokenizer")
    ids = torch.tensor([tok(context)["input_ids"]], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()
    pair = torch.softmax(logits[[sure, unsure]], dim=-1)
    return float(pair[0])
