"""transformers backend: `model.generate` on a left-padded batch with the KV cache.

Works with any causal LM transformers can run: a base model, a `PeftModel` (base + adapter, adapter
active) or a merged model. Stop strings are checked on decoded text by a stopping criterion that marks
each row done on its own, so a row that has stopped gets no more tokens while the others continue.
Sampling draws from torch's global RNG, seeded per batch inside `fork_rng` so the caller's RNG state
(which training resume depends on) is left untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from tunelab.generate.engine import Completion, SamplingSettings, cut_at_stop


class _StopOnText(StoppingCriteria):
    """Per-row stop: a row is done once the tail of its generated text contains a stop string."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], prompt_len: int, rows: int) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_len = prompt_len
        # a stop string spans at most len(stop) tokens (+ slack for tokens that decode to partial characters)
        self.window = max(len(s) for s in stops) + 4
        self.done = torch.zeros(rows, dtype=torch.bool)
        self.stopped_at = [0] * rows  # generated-token count when the stop string appeared

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_len
        live = [i for i in range(input_ids.shape[0]) if not self.done[i]]
        if live and generated > 0:
            start = max(self.prompt_len, input_ids.shape[1] - self.window)
            tails = self.tokenizer.batch_decode(input_ids[live, start:], skip_special_tokens=True)
            for i, tail in zip(live, tails, strict=True):
                if any(s in tail for s in self.stops):
                    self.done[i] = True
                    self.stopped_at[i] = generated
        return self.done.to(input_ids.device)


@contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    # dropout off while generating; the caller may be mid-training and expects its mode back
    was_training = model.training
    model.eval()
    try:
        # no_grad, not inference_mode: tensors a model caches lazily here must stay usable in training
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config (chat end-of-turn tokens)."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)


class HFBackend:
    name = "hf"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)

    def _config(self, s: SamplingSettings) -> GenerationConfig:
        # every knob is explicit: transformers would otherwise fill gaps from the checkpoint's
        # generation_config.json (e.g. top_k=50, repetition penalties) and change what we measure
        kw: dict[str, Any] = dict(
            max_new_tokens=s.max_new_tokens, num_beams=1, num_return_sequences=1, use_cache=True,
            repetition_penalty=1.0, eos_token_id=self.eos or None, pad_token_id=self.pad,
        )
        if s.greedy:
            return GenerationConfig(do_sample=False, **kw)
        return GenerationConfig(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0, **kw)

    def _pad_left(self, rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return ids.to(device), mask.to(device)

    def generate(self, rows: list[list[int]], settings: SamplingSettings, seed: int) -> list[Completion]:
        device = next(self.model.parameters()).device
        ids, mask = self._pad_left(rows, device)
        stop = _StopOnText(self.tokenizer, settings.stop, ids.shape[1], len(rows)) if settings.stop else None
        devices = [device] if device.type == "cuda" else []
        with _inference(self.model), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=self._config(settings),
                stopping_criteria=StoppingCriteriaList([stop] if stop else []),
            )
        new = out[:, ids.shape[1] :].tolist()
        return [self._finish(new[i], settings, stop.stopped_at[i] if stop else 0) for i in range(len(rows))]

    def _finish(self, tokens: list[int], settings: SamplingSettings, stopped_at: int) -> Completion:
        """Trim a generated row (padding after stop/EOS), decode it and cut it at the stop string."""
        n, reason = len(tokens), "length"
        if stopped_at:
            n, reason = stopped_at, "stop"
        eos_at = next((i for i, t in enumerate(tokens[:n]) if t in self.eos), None)
        if eos_at is not None:
            n, reason = eos_at, "eos"
        text = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
        text, hit = cut_at_stop(text, settings.stop)
        return Completion(text, n, "stop" if hit else reason)  # type: ignore[arg-type]
