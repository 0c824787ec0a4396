"""Batched text generation for evaluation: prompts in, `n` completions per prompt out.

A prompt is either a list of chat messages (rendered with the tokenizer's chat template and
`add_generation_prompt=True`, via `tunelab.data.templating.render`) or a plain string (raw completion
mode: the model continues the text). Every (prompt, sample) pair is one row with its own sampling seed
(`row_seed`); the backend decodes up to `batch_size` rows at a time and hands back each row when it
finishes. Stop strings are matched on decoded text, a row stops as soon as it emits one, and the returned
text ends before it. The work is done by a backend (`backends/hf.py`: continuous batching over one
left-padded KV cache, a finished row's place going to the next prompt; `backends/vllm.py`: vLLM when
installed, on CUDA, with the weights on disk); both return the same `Completion` records.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tunelab.data.templating import render
from tunelab.errors import UserError

Messages = list[dict[str, str]]
Prompt = str | Messages


@dataclass(frozen=True)
class SamplingSettings:
    """How to decode. `temperature == 0` means greedy (then `top_p` and `seed` play no part)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.n < 1:
            raise UserError("generation: max_new_tokens and n must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError("generation: temperature must be >= 0 and top_p in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    text: str
    n_tokens: int  # generated tokens kept (up to the stop string or end-of-sequence token)
    finish_reason: Literal["stop", "eos", "length"]


@dataclass
class Generated:
    """One finished row: the `sample`-th completion of prompt number `prompt_index`."""

    prompt_index: int
    sample: int
    completion: Completion


@dataclass
class _Row:
    prompt_index: int
    sample: int
    ids: list[int] = field(repr=False)


def row_seed(seed: int, prompt_index: int, sample: int) -> int:
    """The sampling seed of one (prompt, sample) row: fixed by the run's seed, not by how rows are batched."""
    return (seed * 1_000_003 + prompt_index * 65_537 + sample) % (2**63 - 1)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string (excluded) and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class Engine:
    """Generates completions with one model; see the module docstring.

    `model_path` / `adapter_path` say where the weights live on disk; only then can the vLLM backend be
    used (it loads weights itself). Without them an in-memory model is always generated with transformers,
    so an adapter trained in this process is never silently swapped for the weights on disk.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 16,
        backend: Literal["auto", "hf", "vllm"] = "auto",
        model_path: str | None = None,
        adapter_path: str | None = None,
    ) -> None:
        from tunelab.generate.backends import make_backend

        if batch_size < 1:
            raise UserError("generation: batch_size must be at least 1")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.backend = make_backend(backend, model, tokenizer, model_path=model_path, adapter_path=adapter_path)

    def render(self, prompt: Prompt) -> str:
        """The exact text the model sees for `prompt`."""
        if isinstance(prompt, str):
            return prompt
        return render(self.tokenizer, prompt, add_generation_prompt=True)

    def encode(self, prompt: Prompt) -> list[int]:
        # a rendered chat template already holds its special tokens; raw text gets the tokenizer's BOS, if any
        ids = self.tokenizer(self.render(prompt), add_special_tokens=isinstance(prompt, str))["input_ids"]
        if not ids:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise UserError("generation: an empty prompt needs a tokenizer with a BOS token")
            ids = [bos]
        return list(ids)

    def stream(self, prompts: Sequence[Prompt], settings: SamplingSettings) -> Iterator[list[Generated]]:
        """Yield finished rows in small groups as the backend finishes them, so callers can score early."""
        encoded = [self.encode(p) for p in prompts]
        rows = [_Row(i, s, ids) for i, ids in enumerate(encoded) for s in range(settings.n)]
        # longest first: a prompt too long for the model fails at once rather than after an hour of work
        rows.sort(key=lambda r: (-len(r.ids), r.prompt_index, r.sample))
        seeds = [row_seed(settings.seed, r.prompt_index, r.sample) for r in rows]
        flush = min(8, self.batch_size)
        ready: list[Generated] = []
        for finished in self.backend.generate([r.ids for r in rows], settings, seeds, self.batch_size):
            ready += [Generated(rows[k].prompt_index, rows[k].sample, c) for k, c in finished]
            if len(ready) >= flush:
                yield ready
                ready = []
        if ready:
            yield ready

    def generate(self, prompts: Sequence[Prompt], settings: SamplingSettings) -> list[list[Completion]]:
        """`settings.n` completions for every prompt, in input order."""
        out: list[list[Completion | None]] = [[None] * settings.n for _ in prompts]
        for batch in self.stream(prompts, settings):
            for g in batch:
                out[g.prompt_index][g.sample] = g.completion
        return out  # type: ignore[return-value]


def generate(
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], settings: SamplingSettings | None = None, **engine_kw: Any
) -> list[list[Completion]]:
    """One-shot helper: `Engine(model, tokenizer, **engine_kw).generate(prompts, settings)`."""
    return Engine(model, tokenizer, **engine_kw).generate(prompts, settings or SamplingSettings())
