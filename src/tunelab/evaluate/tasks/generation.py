"""Reference-based text generation from your own JSONL: short answers, summaries, translations.

One JSON object per line: `prompt` and `reference` (a string) or `references` (a list of strings), optional
`id`. Every completion is compared with its references by four metrics: `exact_match` and `contains`
(after trimming and collapsing whitespace, optionally ignoring case; a hit on any reference counts),
`rouge_l` (ROUGE-L F-measure, Lin 2004, via the `rouge-score` package, best over references) and `bleu`
(Papineni et al. 2002, via `sacrebleu`: the task-level value is corpus BLEU over all samples on sacrebleu's
0-100 scale; the per-sample value is sentence BLEU with effective order). A sample "passes" when
`pass_metric` (exact_match or contains) holds, which also yields the unbiased pass@k (Chen et al. 2021,
arXiv 2107.03374) for k <= n_samples.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cached_property
from typing import Any, Literal

from pydantic import Field

from tunelab.errors import UserError
from tunelab.evaluate.tasks import TASKS
from tunelab.evaluate.tasks._base import (
    Problem,
    Prompt,
    SampleResult,
    Task,
    TaskConfig,
    pass_at_k_metrics,
    read_jsonl,
)


class TextGenerationConfig(TaskConfig):
    name: Literal["generation"] = "generation"
    path: str = Field(description="JSONL file: prompt and reference (string) or references (list) per line")
    max_new_tokens: int = Field(128, ge=1, description="generated tokens per completion")
    pass_metric: Literal["exact_match", "contains"] = Field("exact_match", description="what counts as a pass")
    ignore_case: bool = Field(False, description="compare case-insensitively (exact_match, contains)")
    stop: list[str] = Field(default_factory=list, description="stop strings, e.g. ['\\n'] for one-line answers")
    system_prompt: str | None = Field(None, description="system message in chat mode")


def _norm(text: str, ignore_case: bool) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text.lower() if ignore_case else text


def _references(row: dict[str, Any], where: str) -> list[str]:
    if "references" in row:
        refs = row["references"]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise UserError(f"{where}: 'references' must be a non-empty list of strings")
        return refs
    if isinstance(row.get("reference"), str):
        return [row["reference"]]
    raise UserError(f"{where}: needs 'reference' (a string) or 'references' (a list of strings)")


@TASKS.register("generation")
class Generation(Task):
    Config = TextGenerationConfig
    executes_code = False

    def __init__(self, cfg: TextGenerationConfig, *, chat_template: bool = True) -> None:
        super().__init__(cfg, chat_template=chat_template)
        self._texts: dict[str, tuple[list[str], list[str]]] = {}

    def load(self) -> list[Problem]:
        path = self.cfg.path  # type: ignore[attr-defined]
        problems = []
        for lineno, row in read_jsonl(path, "generation.path"):
            where = f"{path}:{lineno}"
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise UserError(f"{where}: 'prompt' must be a non-empty string")
            pid = str(row.get("id", lineno))
            problems.append(Problem(id=pid, prompt=row["prompt"], references=_references(row, where)))
        if len({p.id for p in problems}) != len(problems):
            raise UserError(f"{path}: ids are not unique")
        return problems

    def prompt(self, problem: Problem) -> Prompt:
        if self.mode == "completion":
            return problem.prompt
        system = self.cfg.system_prompt  # type: ignore[attr-defined]
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": problem.prompt}]

    def stop(self) -> tuple[str, ...]:
        return tuple(self.cfg.stop)  # type: ignore[attr-defined]

    @cached_property
    def _rouge(self) -> Any:
        from rouge_score import rouge_scorer

        return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def sample_metrics(self, completion: str, references: Sequence[str]) -> dict[str, float]:
        from sacrebleu.metrics import BLEU

        ic = self.cfg.ignore_case  # type: ignore[attr-defined]
        out, refs = _norm(completion, ic), [_norm(r, ic) for r in references]
        return {
            "exact_match": float(any(out == r for r in refs)),
            "contains": float(any(r in out for r in refs)),
            "rouge_l": max(self._rouge.score(r, completion)["rougeL"].fmeasure for r in references),
            "bleu": BLEU(effective_order=True).sentence_score(completion, list(references)).score,
        }

    def score(self, problem: Problem, completions: Sequence[str]) -> list[SampleResult]:
        key = self.cfg.pass_metric  # type: ignore[attr-defined]
        # corpus BLEU is not a mean of per-sample values: keep the texts for `metrics`
        self._texts[problem.id] = (list(completions), problem.references)
        results = []
        for c in completions:
            m = self.sample_metrics(c, problem.references)
            ok = m[key] == 1.0
            reason = "" if ok else f"{key} failed against {len(problem.references)} reference(s)"
            results.append(SampleResult(ok, "passed" if ok else "failed", reason, None, m))
        return results

    def metrics(self, results: dict[str, list[SampleResult]]) -> dict[str, float]:
        samples = [s for rs in results.values() for s in rs]
        if not samples:
            return {}
        out = pass_at_k_metrics([(len(r), sum(s.passed for s in r)) for r in results.values()])
        for name in ("exact_match", "contains", "rouge_l"):
            out[name] = sum(s.metrics[name] for s in samples) / len(samples)
        out["bleu"] = self._corpus_bleu(results)
        return out

    def _corpus_bleu(self, results: dict[str, list[SampleResult]]) -> float:
        from sacrebleu.metrics import BLEU

        hyps: list[str] = []
        refs: list[list[str]] = []
        for pid in results:
            completions, references = self._texts[pid]
            hyps += completions
            refs += [references] * len(completions)
        width = max(len(r) for r in refs)
        # sacrebleu wants one stream per reference slot; None marks a missing reference
        streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
        return BLEU().corpus_score(hyps, streams).score
