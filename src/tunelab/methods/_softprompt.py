"""Shared machinery of tunelab's soft-prompt methods (DePT, EPT): written in-house, not peft's prompt tuning.

A `SoftPromptLM` wraps a frozen transformers causal LM. Its forward embeds the ids with the base's own input
embeddings, adds the method's position-wise embedding offset (DePT's c * A B, rows indexed by token
position), prepends the m prompt vectors, extends the attention mask with ones and calls the base with
`inputs_embeds`. The logits so carry m extra LEADING positions (`Method.virtual_tokens = m`; tunelab's
log-prob code keeps the last L). A method only says how its prompt is built (`PromptSource.prompt`).

Positions: a token's position is the number of real (mask = 1) tokens before it, so right padding (training)
and left padding (generation) give every real token the position it has alone; the base sees the prompt
at 0..m-1 and a token at m + position, which is what transformers' `generate` computes from the extended mask.
The offset covers positions 0..s-1; later positions get none.

`generate` drives the base's own `generate` with `inputs_embeds` and a forward pre-hook that gives every
generated token the same offset as training does (transformers would embed it plainly); stopping criteria
see, and the result holds, the original ids followed by the new tokens, as `generate` does without a prompt.
Packed rows (position ids that restart) are refused: the prompt would precede only the first sample.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from tunelab.errors import UserError
from tunelab.methods._adapters import AdapterModule, TunelabMethod, freeze_all, hidden_size

IGNORE = -100
#: DePT's prompt lr (3e-1) was tuned on T5, whose embeddings transformers initialises at std 1.0; decoder LMs
#: start theirs at initializer_range ~0.02. With Adam a step moves an entry by about the lr whatever the
#: gradient's size, so the default prompt lr is this factor times the model's embedding RMS (6e-3 at 0.02).
PROMPT_LR_PER_EMBEDDING_RMS = 0.3


class SoftPromptFields(BaseModel):
    """Fields shared by the soft-prompt methods; each method's Config adds its `name` and own fields."""

    model_config = ConfigDict(extra="forbid")
    prompt_length: int = Field(20, gt=0, description="m: soft-prompt vectors prepended to every sequence")
    offset_positions: int = Field(256, gt=0, description="s: positions 0..s-1 get a learned embedding offset; later ones none")
    r: int = Field(30, gt=0, description="rank of the offset A (s x r) B (r x d)")
    alpha: float = Field(8.0, gt=0, description="offset scale c = alpha / sqrt(r)")
    prompt_init: Literal["vocab", "normal"] = Field(
        "vocab", description="vocab: embeddings of random vocabulary tokens; normal: N(0, embedding RMS^2) entries")
    init_seed: int = Field(0, description="seed of the prompt and A initialisation (the global RNG is untouched)")
    prompt_lr: float | None = Field(None, gt=0, description="learning rate of the prompt; null: 0.3 x the embedding RMS")
    offset_lr: float | None = Field(None, gt=0, description="learning rate of A and B; null: the run's lr")


def token_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position of every column: real tokens before it (left padding gets 0, right padding repeats the last)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def dept_offset(a: torch.Tensor, b: torch.Tensor, scale: float, positions: torch.Tensor) -> torch.Tensor:
    """c * (A B)[t] for every position t in 0..s-1 (s = rows of A), zero for t >= s; shape positions + (d,)."""
    inside = (positions >= 0) & (positions < a.shape[0])
    rows = a[positions.clamp(0, a.shape[0] - 1)] * inside[..., None].to(a.dtype)
    return scale * (rows @ b)


def embedding_rms(model: nn.Module) -> float:
    """Root mean square of the input-embedding entries, summed in float64 a block of rows at a time (no full copy)."""
    weight = model.get_input_embeddings().weight.detach()  # type: ignore[operator]
    squares = sum(float(block.double().square().sum()) for block in weight.split(4096))
    return math.sqrt(squares / weight.numel())


def initial_prompt(model: nn.Module, m: int, how: str, gen: torch.Generator) -> torch.Tensor:
    weight = model.get_input_embeddings().weight.detach()  # type: ignore[operator]
    if how == "normal":
        return torch.randn(m, weight.shape[1], generator=gen) * embedding_rms(model)
    if m > weight.shape[0]:
        raise UserError(f"method.prompt_length={m} exceeds the vocabulary ({weight.shape[0]}); lower it or set method.prompt_init=normal")
    rows = torch.randperm(weight.shape[0], generator=gen)[:m]
    return weight[rows.to(weight.device)].float().cpu().clone()


class PromptSource(AdapterModule):
    """DePT's trainable tensors: the prompt P (m x d) and the offset factors A (s x r), B (r x d).

    A is Kaiming-uniform (a = sqrt(5), fan-in r: U(-1/sqrt(r), 1/sqrt(r))) and B zero, so the offset starts at
    zero; both drawn from `gen` so building the model leaves the global RNG alone. Subclasses change `prompt`.
    """

    def __init__(self, prompt: torch.Tensor, positions: int, r: int, alpha: float, gen: torch.Generator) -> None:
        super().__init__()
        d = prompt.shape[1]
        self.scale = alpha / math.sqrt(r)
        self.prompt_vectors = nn.Parameter(prompt.float())
        self.offset_a = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(positions, r), a=math.sqrt(5), generator=gen))
        self.offset_b = nn.Parameter(torch.zeros(r, d))

    def prompt(self) -> torch.Tensor:
        """The m x d vectors prepended to every sequence."""
        return self.prompt_vectors

    def offset(self, positions: torch.Tensor) -> torch.Tensor:
        return dept_offset(self.offset_a, self.offset_b, self.scale, positions)

    def prompt_parameters(self) -> list[nn.Parameter]:
        return [self.prompt_vectors]

    def offset_parameters(self) -> list[nn.Parameter]:
        return [self.offset_a, self.offset_b]


class SoftPromptLM(nn.Module):
    """A frozen causal LM with a soft prompt and an embedding offset; `source.active` False gives the base."""

    def __init__(self, base: nn.Module, source: PromptSource) -> None:
        super().__init__()
        self.base = base
        self.tunelab_prompt = source

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def generation_config(self) -> Any:
        return self.base.generation_config

    @property
    def device(self) -> torch.device:
        return self.base.device  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype  # type: ignore[return-value]

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()  # type: ignore[operator]

    def get_output_embeddings(self) -> nn.Module | None:
        return self.base.get_output_embeddings()  # type: ignore[operator]

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("a soft prompt is no transformers checkpoint: the method's save_final writes tunelab's format")

    @property
    def m(self) -> int:
        return self.tunelab_prompt.prompt_vectors.shape[0]

    def embed(self, input_ids: torch.Tensor | None, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """E(x) + offset at each token's position (the offset is the method's, identical in training and generation)."""
        embeds = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        return embeds + self.tunelab_prompt.offset(positions).to(embeds.dtype)

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None, **kw: Any,
    ) -> Any:
        if not self.tunelab_prompt.active:
            return self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, labels=labels, **kw)
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("SoftPromptLM.forward needs input_ids or inputs_embeds")
        rows, length, device = ref.shape[0], ref.shape[1], ref.device
        if position_ids is not None:
            if position_ids.shape[-1] > 1 and bool((position_ids.diff(dim=-1) <= 0).any()):
                raise NotImplementedError("soft-prompt methods cannot run on packed rows (the prompt would precede only "
                                          "the first sample); set data.packing=false")
            pos = position_ids.expand(rows, -1)
        elif attention_mask is not None:
            pos = token_positions(attention_mask)
        else:
            pos = torch.arange(length, device=device).expand(rows, -1)
        embeds = self.embed(input_ids, pos, inputs_embeds)
        prompt = self.tunelab_prompt.prompt().to(embeds.dtype)
        full = torch.cat([prompt.expand(rows, -1, -1), embeds], dim=1)
        base_pos = torch.cat([torch.arange(self.m, device=device).expand(rows, -1), pos + self.m], dim=1)
        mask = None if attention_mask is None else torch.cat([attention_mask.new_ones(rows, self.m), attention_mask], dim=1)
        if labels is not None:
            labels = torch.cat([labels.new_full((rows, self.m), IGNORE), labels], dim=1)
        return self.base(inputs_embeds=full, attention_mask=mask, position_ids=base_pos, labels=labels, **kw)

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        stopping_criteria: StoppingCriteriaList | None = None, **kw: Any,
    ) -> Any:
        """transformers' `generate` with the prompt and offset; returns [rows, width + new] like a plain model."""
        if not self.tunelab_prompt.active:
            return self.base.generate(input_ids=input_ids, attention_mask=attention_mask,  # type: ignore[operator]
                                      stopping_criteria=stopping_criteria, **kw)
        if "inputs_embeds" in kw:
            raise NotImplementedError("SoftPromptLM.generate takes input_ids (the prompt and offset are added here)")
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        embeds = self.embed(input_ids, token_positions(mask))
        rows = input_ids.shape[0]
        prompt = self.tunelab_prompt.prompt().to(embeds.dtype).expand(rows, -1, -1)
        criteria = StoppingCriteriaList([_SeesPrompt(c, input_ids) for c in stopping_criteria or []])
        hook = self.base.register_forward_pre_hook(self._offset_generated, with_kwargs=True)
        try:
            out = self.base.generate(  # type: ignore[operator]
                inputs_embeds=torch.cat([prompt, embeds], dim=1),
                attention_mask=torch.cat([mask.new_ones(rows, self.m), mask], dim=1), stopping_criteria=criteria, **kw,
            )
        finally:
            hook.remove()
        if isinstance(out, torch.Tensor):
            return torch.cat([input_ids, out.to(input_ids.device)], dim=1)
        out.sequences = torch.cat([input_ids, out.sequences.to(input_ids.device)], dim=1)
        return out

    def _offset_generated(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Before each decoding step of the base: embed the new tokens here, with the offset at their positions."""
        if args:
            raise RuntimeError("SoftPromptLM.generate: the base was called with positional inputs; cannot add the offset")
        ids = kwargs.get("input_ids")
        if ids is None or kwargs.get("inputs_embeds") is not None:
            return None  # the prefill step: its embeddings already carry the prompt and offset
        pos = kwargs.get("position_ids")
        if pos is None:
            mask = kwargs.get("attention_mask")
            if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
                raise RuntimeError("SoftPromptLM.generate: no position ids or 2-D mask to place the generated tokens")
            pos = token_positions(mask)[:, -ids.shape[1] :]
        return args, {**kwargs, "input_ids": None, "inputs_embeds": self.embed(ids, pos - self.m)}


class _SeesPrompt(StoppingCriteria):
    """A stopping criterion shown the original ids before the new tokens (generate from embeddings shows only these)."""

    def __init__(self, inner: Any, prompt_ids: torch.Tensor) -> None:
        self.inner, self.prompt_ids = inner, prompt_ids

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> Any:
        return self.inner(torch.cat([self.prompt_ids.to(input_ids.device), input_ids], dim=1), scores, **kwargs)


class SoftPromptMethod(TunelabMethod):
    """A soft prompt prepended to the input plus a position-wise embedding offset; subclasses build the source."""

    identity_at_init = False  # the prompt changes the outputs from the start
    supports_packing = False

    @property
    def virtual_tokens(self) -> int:  # type: ignore[override]
        return self.cfg.prompt_length  # type: ignore[attr-defined]

    def build_source(self, model: nn.Module, prompt: torch.Tensor, gen: torch.Generator) -> PromptSource:
        raise NotImplementedError  # each method builds its own prompt source

    def apply(self, model: nn.Module) -> nn.Module:
        cfg: SoftPromptFields = self.cfg  # type: ignore[assignment]
        if not callable(getattr(model, "get_input_embeddings", None)) or not callable(getattr(model, "generate", None)):
            raise UserError(f"method '{self.cfg.name}' needs a transformers causal LM (input embeddings and generate)")  # type: ignore[attr-defined]
        freeze_all(model)
        gen = torch.Generator().manual_seed(cfg.init_seed)
        source = self.build_source(model, initial_prompt(model, cfg.prompt_length, cfg.prompt_init, gen), gen)
        source.to(device=model.get_input_embeddings().weight.device)  # type: ignore[operator]
        return SoftPromptLM(model, source)

    def extra_groups(self, source: PromptSource, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return []  # a subclass's own parameters

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """The prompt at `prompt_lr` without weight decay (decay would pull it off the embedding scale), A and B
        at `offset_lr` with the run's decay (DePT's two learning rates), then the subclass's groups."""
        cfg: SoftPromptFields = self.cfg  # type: ignore[assignment]
        lm = getattr(model, "module", model)  # a DDP/FSDP wrapper holds the model as .module
        assert isinstance(lm, SoftPromptLM), f"{type(model).__name__} was not built by a soft-prompt method"
        source = lm.tunelab_prompt
        prompt_lr = cfg.prompt_lr or PROMPT_LR_PER_EMBEDDING_RMS * embedding_rms(lm.base)
        return [
            {"params": source.prompt_parameters(), "lr": prompt_lr, "weight_decay": 0.0},
            {"params": source.offset_parameters(), "lr": cfg.offset_lr or lr, "weight_decay": weight_decay},
            *self.extra_groups(source, lr, weight_decay),
        ]

    def dept_count(self, model: nn.Module) -> int:
        """m * d + s * r + r * d: the prompt and the two offset factors."""
        cfg: SoftPromptFields = self.cfg  # type: ignore[assignment]
        d = hidden_size(model)
        return cfg.prompt_length * d + cfg.offset_positions * cfg.r + cfg.r * d

