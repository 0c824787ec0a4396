"""HFT, Half Fine-Tuning: each stage trains a freshly drawn half of the model, the other half stays frozen.

Hui, Zhang, Wang, Xu, Sun, Wu, "HFT: Half Fine-Tuning for Large Language Models", ACL 2025, arXiv 2404.18466.

Maths: theta = (theta_upd, theta_frozen) with a binary mask M over parameter categories; a step updates only
M * theta (theta_frozen keeps its value from the previous stage), which the paper reads as full fine-tuning
with a penalty ||(1 - M)(theta - theta_prev)||^2. Optimizer state exists only for the trainable half.

Category-level selection (the paper's best; from a secondary source, METHODS.md A9), inside every block:
- attention projections (Llama q, k, v, o): half of them train (2 of 4);
- feed-forward projections (Llama gate, up, down): half of the blocks train 2 of 3, the other half 1 of 3;
- the block's norms (input and post-attention): half likewise (1 of 2).
Generalised by sub-layer role: the units of a block are its modules that own parameters directly (a linear
layer with its bias, a norm); a unit is `norm` if its class is a norm, else `attn` or `ffn` by the sub-layer
it sits in, else `other`. A category with n units per block trains n/2 of them; for odd n, a random half of
the blocks (floor(L/2) of them) trains ceil(n/2) and the rest floor(n/2), so exactly half when L is even
and slightly under half when L is odd (our choice). GPT-2: attention {c_attn (fused q, k, v), c_proj} ->
1 of 2, feed-forward {c_fc, c_proj} -> 1 of 2, norms {ln_1, ln_2} -> 1 of 2; c_attn is one unit because its
q, k, v share one weight and one bias.
Outside the blocks: the input embeddings (and learned position tables) train when `train_embeddings`, the
LM head and everything else outside the blocks (the final norm) when `train_head`; both default to true per
the secondary source (UNCONFIRMED in the paper). With tied embeddings the shared matrix trains if either is
set.

Stages (choices of ours): the paper redraws the half for each new fine-tuning stage (SFT -> DPO, or each task
of continual learning). Here `stages` splits one run's steps into equal stages: step s is in stage
min(stages - 1, s * stages // total_steps), and stage k's half is drawn from a generator seeded with
`seed + k`, so the selection is a pure function of the step (exact resume). `on_step` applies it; a unit
that becomes frozen loses its gradient and its optimizer state, a unit that becomes trainable again starts
with fresh state. The paper's ratio is 50% (40-60% work alike); it is fixed at half here. Weights train in
place: saved as full weights, trivially merged, not switchable off. `stages > 1` is refused on several
processes (DDP fixes its set of synchronised parameters when it wraps the model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._adapters import block_part, decoder_blocks, freeze_all
from tunelab.methods._base import Method

CATEGORIES = ("attn", "ffn", "norm", "other")


class HFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["hft"] = "hft"
    stages: int = Field(1, ge=1, description="split the run's steps into this many equal stages; each trains a newly drawn half")
    seed: int = Field(0, description="stage k's half is drawn from a generator seeded with seed + k")
    train_embeddings: bool = Field(True, description="train the input (and position) embeddings in every stage")
    train_head: bool = Field(True, description="train the LM head and the final norm in every stage")


@dataclass(frozen=True)
class Unit:
    """A module of a block that owns parameters: the smallest thing HFT selects."""

    block: int
    category: str
    params: tuple[str, ...]


def stage_of(step: int, total_steps: int, stages: int) -> int:
    return min(stages - 1, step * stages // max(1, total_steps))


def draw_half(counts: list[dict[str, int]], seed: int) -> list[dict[str, list[int]]]:
    """counts[b][c]: units of category c in block b -> the indices (within b, c) that train.

    Each category trains n // 2 units per block; for odd n, floor(L / 2) randomly chosen blocks train one more.
    """
    g = torch.Generator().manual_seed(seed)
    chosen: list[dict[str, list[int]]] = [{} for _ in counts]
    for cat in CATEGORIES:
        blocks = [b for b, c in enumerate(counts) if c.get(cat)]
        order = torch.randperm(len(blocks), generator=g).tolist()
        more = {blocks[i] for i in order[: len(blocks) // 2]}
        for b in blocks:
            n = counts[b][cat]
            k = n // 2 + (n % 2 if b in more else 0)
            chosen[b][cat] = sorted(torch.randperm(n, generator=g)[:k].tolist())
    return chosen


def block_units(model: nn.Module) -> list[list[Unit]]:
    """The units of every block, in module order, each with its category."""
    names = {id(m): n for n, m in model.named_modules()}
    out: list[list[Unit]] = []
    for b, block in enumerate(decoder_blocks(model)):
        parts: dict[str, str] = {}
        for part in ("attn", "ffn"):
            # a block without such a sub-layer (BERT's FFN is two children) has its units in `other`
            with suppress(UserError):
                parts[block_part(block, part)[0]] = part  # type: ignore[arg-type]
        units = []
        for sub_name, sub in block.named_modules():
            own = [p for p, t in sub._parameters.items() if t is not None]
            if not own:
                continue
            if "norm" in type(sub).__name__.lower():
                cat = "norm"
            else:
                cat = parts.get(sub_name.split(".")[0], "other")
            prefix = f"{names[id(block)]}.{sub_name}" if sub_name else names[id(block)]
            units.append(Unit(b, cat, tuple(f"{prefix}.{p}" for p in own)))
        out.append(units)
    return out


def outside_params(model: nn.Module, in_blocks: set[str], embeddings: bool, head: bool) -> set[str]:
    """Names of the parameters outside the blocks that train in every stage."""
    emb = {id(p) for p in model.get_input_embeddings().parameters()}  # type: ignore[operator]
    emb |= {id(p) for n, m in model.named_modules() if n.endswith(("wpe", "embed_positions", "position_embeddings")) for p in m.parameters()}
    out = model.get_output_embeddings()  # type: ignore[operator]
    head_ids = {id(p) for p in out.parameters()} if out is not None else set()
    return {n for n, p in model.named_parameters()
            if n not in in_blocks and ((embeddings and id(p) in emb) or (head and (id(p) not in emb or id(p) in head_ids)))}


@METHODS.register("hft")
class HFT(Method):
    """Half Fine-Tuning: half of each block's parameter categories train, redrawn per stage."""

    Config = HFTConfig
    saved_format = "full"
    mergeable = True
    identity_at_init = True
    can_disable = False

    def __init__(self, cfg: BaseModel) -> None:
        super().__init__(cfg)
        self._units: list[list[Unit]] = []
        self._outside: set[str] = set()
        self._stage = 0

    def selection(self, stage: int) -> list[Unit]:
        """The units that train in `stage` (a pure function of the model's structure, `seed` and `stage`)."""
        cats = [{c: [u for u in units if u.category == c] for c in CATEGORIES} for units in self._units]
        counts = [{c: len(us) for c, us in blk.items() if us} for blk in cats]
        picks = draw_half(counts, self.cfg.seed + stage)  # type: ignore[attr-defined]
        return [cats[b][c][i] for b, blk in enumerate(picks) for c, idx in blk.items() for i in idx]

    def _selectable(self) -> set[str]:
        return {n for units in self._units for u in units for n in u.params} | self._outside

    def apply(self, model: nn.Module) -> nn.Module:
        cfg: HFTConfig = self.cfg  # type: ignore[assignment]
        dist = torch.distributed
        if cfg.stages > 1 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise NotImplementedError("hft with stages > 1 on several processes: DDP registers the trainable parameters once, "
                                      "so a half that starts training in a later stage would not be synchronised")
        self._units = block_units(model)
        in_blocks = {n for units in self._units for u in units for n in u.params}
        self._outside = outside_params(model, in_blocks, cfg.train_embeddings, cfg.train_head)
        freeze_all(model)
        params = dict(model.named_parameters())
        for n in self._outside:
            params[n].requires_grad_(True)
        self._set_stage(model, 0)
        return model

    def _set_stage(self, model: nn.Module, stage: int) -> None:
        self._stage = stage
        on = {n for u in self.selection(stage) for n in u.params}
        params = dict(model.named_parameters())
        for units in self._units:
            for u in units:
                for n in u.params:
                    params[n].requires_grad_(n in on)

    def on_step(self, step: int, total_steps: int, model: nn.Module, optimizer: Any) -> None:
        stage = stage_of(step, total_steps, self.cfg.stages)  # type: ignore[attr-defined]
        if stage == self._stage:
            return
        self._set_stage(model, stage)
        params = dict(model.named_parameters())
        for n in self._selectable():
            p = params[n]
            if not p.requires_grad:
                # AdamW skips a parameter whose grad is None (no update, no weight decay); its state would
                # only hold memory the paper's method saves, and a later stage that trains it starts afresh
                p.grad = None
                optimizer.state.pop(p, None)

    def expected_trainable(self, model: nn.Module) -> int:
        """sum of the sizes of the units drawn for the current stage (from their shapes; exactly half of each
        block's units per category, see the module docstring), plus the embeddings / head / final norm."""
        shapes = {n: p.shape for n, p in model.named_parameters()}
        return sum(shapes[n].numel() for u in self.selection(self._stage) for n in u.params) + sum(shapes[n].numel() for n in self._outside)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """The shared decay / no-decay groups over EVERY parameter a stage may train: the loop builds the
        optimizer once, and a frozen parameter has no grad, so AdamW leaves it (and its decay) alone."""
        from tunelab.train.optim import param_groups

        with _all_trainable(model, self._selectable()):
            return param_groups(model, lr, weight_decay)

    def checkpoint_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter any stage trains, so a resume in a later stage restores what earlier stages changed."""
        keep = self._selectable()
        return {n: p.detach() for n, p in model.named_parameters() if n in keep}


@contextmanager
def _all_trainable(model: nn.Module, names: set[str]) -> Iterator[None]:
    params = [p for n, p in model.named_parameters() if n in names]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, was in zip(params, before, strict=True):
            p.requires_grad_(was)
