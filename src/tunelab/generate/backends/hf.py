"""transformers backend: continuous batching over one left-padded KV cache, with `model.generate` as fallback.

Static batches (cut the rows into groups, `generate` each group) waste most of the work on code: a group
runs until its longest row ends, while the other rows have long finished. So the default path keeps up
to `batch_size` rows live in one batch and, whenever rows finish, drops them from the KV cache and admits
new ones:

* a new row is prefilled alone (no padding, only the last position's logits are computed) and its cache
  is left-padded to the live cache's length and stacked onto it; the 2-D attention mask marks the padding,
  and each row's position ids count only its real tokens, so a row sees exactly what it would see alone
  (rotary keys are cached after rotation, so shifting them right in the buffer does not change them);
* one decode step feeds every live row its last token;
* a finished row (EOS, a stop string in the tail of its decoded text, or `max_new_tokens`) leaves the
  batch at once and is yielded; leading cache columns that no remaining row uses are cut away.

Sampling draws each row's tokens from its own `torch.Generator` seeded from (seed, prompt, sample), so
a sampled completion does not depend on which rows shared its batch, and the caller's global RNG (which
training resume depends on) is never touched. Greedy decoding is `argmax` of the float32 logits, as in
transformers. Temperature scaling comes before nucleus (top-p) filtering, as in transformers' processors.

The cache surgery needs plain `DynamicLayer` caches (full attention). Models with sliding-window or other
cache layers, and PEFT prompt-learning models (virtual tokens), go through the fallback: static batches of
`model.generate` with per-row stop criteria, seeded per batch inside `fork_rng`.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from tunelab.generate.engine import Completion, SamplingSettings, cut_at_stop

Finished = list[tuple[int, Completion]]


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generators: list[torch.Generator] | None
) -> torch.Tensor:
    """Next token per row from float logits [rows, vocab]: argmax when `temperature == 0`, else one draw
    per row (from that row's generator) from the temperature-scaled distribution cut to its top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability reaches `top_p`: a token is
    kept iff the mass of the tokens ranked above it is below `top_p` (so the top token is always kept).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_above = sorted_p.cumsum(dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_above >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    gens = generators or [None] * probs.shape[0]
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])


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


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config (chat end-of-turn tokens)."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)


def _base_model(model: Any) -> Any:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


@dataclass
class _Live:
    """One row being decoded: its generated tokens (the last one not yet fed to the model)."""

    index: int
    pos: int  # position id of the next token fed
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)


class HFBackend:
    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, *, continuous: bool | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos = eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        params = inspect.signature(_base_model(model).forward).parameters
        # transformers 5.x renamed `past_key_values` to `cache`; accept either
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = "logits_to_keep" in params
        self.continuous = self._continuous_ok() if continuous is None else continuous

    def _continuous_ok(self) -> bool:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        from tunelab.methods._base import needs_model_forward

        if needs_model_forward(self.model):
            return False  # a soft prompt, prefix or side network lives outside the cache the continuous path splices
        config = getattr(self.model, "config", None)
        if config is None or getattr(config, "is_encoder_decoder", False):
            return False
        try:
            layers = DynamicCache(config=config).layers
        except Exception:  # an architecture whose cache layout transformers builds differently
            return False
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def generate(
        self, rows: list[list[int]], settings: SamplingSettings, seeds: list[int], batch_size: int
    ) -> Iterator[Finished]:
        """Decode every row; yield the rows that finished, as they finish, as (row index, completion)."""
        run = self._continuous if self.continuous else self._static
        with _inference(self.model):
            yield from run(rows, settings, seeds, batch_size)

    # -- continuous batching ---------------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, last_only: bool) -> torch.Tensor:
        kw: dict[str, Any] = {self.cache_kw: cache, "use_cache": True}
        if last_only and self.keep_kw:
            kw["logits_to_keep"] = 1  # a prompt's other positions' logits are never used
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw)
        return out.logits[:, -1, :].float()

    def _continuous(
        self, rows: list[list[int]], settings: SamplingSettings, seeds: list[int], batch_size: int
    ) -> Iterator[Finished]:
        from transformers.cache_utils import DynamicCache

        device = next(self.model.parameters()).device
        todo = deque(range(len(rows)))
        live: list[_Live] = []
        cache: Any = None
        mask: torch.Tensor | None = None  # [live rows, cache length], 0 on left padding
        while todo or live:
            if todo and len(live) < batch_size:
                admitted, parts, logits = [], [], []
                while todo and len(live) + len(admitted) < batch_size:
                    i = todo.popleft()
                    part = DynamicCache(config=self.model.config)
                    ids = torch.tensor([rows[i]], device=device)
                    pos = torch.arange(len(rows[i]), device=device)[None]
                    logits.append(self._forward(ids, torch.ones_like(ids), pos, part, last_only=True))
                    parts.append(part)
                    gen = None
                    if not settings.greedy:
                        gen = torch.Generator(device=device).manual_seed(seeds[i])
                    admitted.append(_Live(i, len(rows[i]), gen))
                cache, mask = _stack(cache, mask, parts)
                live += admitted
                stepped, step_logits = admitted, torch.cat(logits)
            else:
                assert mask is not None
                ids = torch.tensor([[r.tokens[-1]] for r in live], device=device)
                pos = torch.tensor([[r.pos] for r in live], device=device)
                mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
                step_logits = self._forward(ids, mask, pos, cache, last_only=False)
                for r in live:
                    r.pos += 1
                stepped = live
            done = self._advance(stepped, step_logits, settings)
            if done:
                yield [(r.index, c) for r, c in done]
                gone = {id(r) for r, _ in done}
                keep = [k for k, r in enumerate(live) if id(r) not in gone]
                live = [live[k] for k in keep]
                if not live:
                    cache, mask = None, None
                else:
                    cache, mask = _select(cache, mask, keep)

    def _advance(self, rows: list[_Live], logits: torch.Tensor, settings: SamplingSettings) -> list[tuple[_Live, Completion]]:
        """Append one sampled token to each row; return the rows that are now finished."""
        gens = None if settings.greedy else [r.generator for r in rows]
        chosen = sample_next(logits, settings.temperature, settings.top_p, gens).tolist()  # type: ignore[arg-type]
        done = []
        for r, tok in zip(rows, chosen, strict=True):
            r.tokens.append(tok)
            if tok in self.eos:
                done.append((r, self._finish(r.tokens[:-1], settings, "eos")))
            elif settings.stop and self._stop_in_tail(r.tokens, settings.stop):
                done.append((r, self._finish(r.tokens, settings, "stop")))
            elif len(r.tokens) >= settings.max_new_tokens:
                done.append((r, self._finish(r.tokens, settings, "length")))
        return done

    def _stop_in_tail(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        # a stop string spans at most len(stop) tokens (+ slack for tokens that decode to partial characters)
        window = max(len(s) for s in stops) + 4
        tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=True)
        return any(s in tail for s in stops)

    def _finish(self, tokens: list[int], settings: SamplingSettings, reason: str) -> Completion:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text, hit = cut_at_stop(text, settings.stop)
        return Completion(text, len(tokens), "stop" if hit else reason)  # type: ignore[arg-type]

    # -- fallback: static batches through model.generate ------------------------------------------------

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

    def _static(
        self, rows: list[list[int]], settings: SamplingSettings, seeds: list[int], batch_size: int
    ) -> Iterator[Finished]:
        device = next(self.model.parameters()).device
        devices = [device] if device.type == "cuda" else []
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(r) for r in batch)
            ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, r in enumerate(batch):
                ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r) :] = 1
            stop = _StopOnText(self, settings.stop, width, len(batch)) if settings.stop else None
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seeds[start])
                out = self.model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=self._config(settings),
                    stopping_criteria=StoppingCriteriaList([stop] if stop else []),
                )
            new = out[:, width:].tolist()
            yield [(start + i, self._trim(new[i], settings, stop.stopped_at[i] if stop else 0)) for i in range(len(batch))]

    def _trim(self, tokens: list[int], settings: SamplingSettings, stopped_at: int) -> Completion:
        """A `generate` row: cut the padding after its stop string or EOS, then decode it."""
        n, reason = len(tokens), "length"
        if stopped_at:
            n, reason = stopped_at, "stop"
        eos_at = next((i for i, t in enumerate(tokens[:n]) if t in self.eos), None)
        if eos_at is not None:
            n, reason = eos_at, "eos"
        return self._finish(tokens[:n], settings, reason)


class _StopOnText(StoppingCriteria):
    """Per-row stop for `model.generate`: a row is done once the tail of its generated text has a stop string."""

    def __init__(self, backend: HFBackend, stops: tuple[str, ...], prompt_len: int, rows: int) -> None:
        self.backend, self.stops, self.prompt_len = backend, stops, prompt_len
        self.done = torch.zeros(rows, dtype=torch.bool)
        self.stopped_at = [0] * rows  # generated-token count when the stop string appeared

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_len
        for i in range(input_ids.shape[0]):
            if generated == 0 or self.done[i]:
                continue  # a finished row's tokens are padding: no decoding them every step
            if self.backend._stop_in_tail(input_ids[i, self.prompt_len :].tolist(), self.stops):
                self.done[i] = True
                self.stopped_at[i] = generated
        return self.done.to(input_ids.device)


def _stack(cache: Any, mask: torch.Tensor | None, parts: list[Any]) -> tuple[Any, torch.Tensor]:
    """The live cache with the freshly prefilled single-row caches appended, all left-padded to one length."""
    lengths = [p.get_seq_length() for p in parts]
    device = parts[0].layers[0].keys.device
    width = max([*lengths, mask.shape[1] if mask is not None else 0])

    def pad(t: torch.Tensor) -> torch.Tensor:  # [rows, heads, length, dim] -> left-padded to `width`
        extra = width - t.shape[2]
        return t if extra == 0 else torch.cat([t.new_zeros(t.shape[0], t.shape[1], extra, t.shape[3]), t], dim=2)

    sources = ([cache] if cache is not None else []) + parts
    target = sources[0]
    for k, layer in enumerate(target.layers):
        layer.keys = torch.cat([pad(s.layers[k].keys) for s in sources], dim=0)
        layer.values = torch.cat([pad(s.layers[k].values) for s in sources], dim=0)
    new_mask = torch.zeros(len(parts), width, dtype=torch.long, device=device)
    for row, n in enumerate(lengths):
        new_mask[row, width - n :] = 1
    if mask is not None:
        mask = torch.cat([torch.cat([mask.new_zeros(mask.shape[0], width - mask.shape[1]), mask], dim=1), new_mask])
    else:
        mask = new_mask
    return target, mask


def _select(cache: Any, mask: torch.Tensor, keep: list[int]) -> tuple[Any, torch.Tensor]:
    """Keep the rows `keep` of the cache and mask, and cut leading columns that only padding uses now."""
    idx = torch.tensor(keep, device=mask.device)
    mask = mask[idx]
    used = mask.any(dim=0).nonzero()
    lead = int(used[0]) if used.numel() else 0
    mask = mask[:, lead:]
    for layer in cache.layers:
        layer.keys = layer.keys[idx, :, lead:]
        layer.values = layer.values[idx, :, lead:]
    return cache, mask
